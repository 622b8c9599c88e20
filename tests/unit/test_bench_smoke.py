"""The benchmarks in bench/ run end to end (smoke mode) and their bookkeeping is right; no timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from overhead import CORE_RUNNERS, JOBS, Measurements, StepClock, make_job, markdown_table, summarise

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_overhead_smoke_trains_every_job_with_every_core_runner(tmp_path: Path) -> None:
    report_path = tmp_path / "overhead.json"
    proc = run_bench("overhead.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    assert "| job | runner | wall ms/step (median) |" in proc.stdout
    rows = {(row["job"], row["runner"]): row for row in json.loads(report_path.read_text())["rows"]}
    for job in JOBS:
        for runner in CORE_RUNNERS:
            row = rows[(job, runner)]
            if job == "workers" and runner == "raw":
                assert "skipped" in row  # the in-memory floor has no __getitem__ to measure
                continue
            assert f"| {job} | {runner} |" in proc.stdout
            # The step clock saw every optimizer step of the job, no more: the timing covers the whole loop.
            assert row["steps"] == make_job(job, smoke=True).max_steps
            assert math.isfinite(row["final_loss"])
            assert row["loss_agrees"], (job, runner, row["final_loss"])


def test_checkpoint_smoke_prints_every_operation(tmp_path: Path) -> None:
    report_path = tmp_path / "checkpoint.json"
    proc = run_bench("checkpoint.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report_path.read_text())["summary"]
    for operation in (
        "torch.save",
        "torch.save + fsync",
        "torch.load",
        "steadyfit save",
        "steadyfit load",
        "steadyfit async, blocked",
        "steadyfit async, total",
    ):
        assert f"| {operation} |" in proc.stdout
        assert summary[operation]["min_s"] <= summary[operation]["median_s"] <= summary[operation]["max_s"]
    assert "Targets:" in proc.stdout


def test_step_clock_counts_each_optimizer_step_once() -> None:
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    clock = StepClock()
    for _ in range(5):
        parameter.grad = torch.ones(2)
        optimizer.step()
    seconds = clock.seconds_per_step()
    optimizer.step()  # after seconds_per_step the hook is removed
    assert clock.count == 5
    assert seconds >= 0


def test_summary_flags_a_runner_whose_final_loss_disagrees() -> None:
    results = Measurements()
    for runner, seconds, loss in (("raw", 1e-3, 1.0), ("steadyfit", 2e-3, 1.05), ("hf", 4e-3, 2.0)):
        row = {
            "seconds_per_step": seconds,
            "cpu_seconds_per_step": seconds / 2,
            "steps": 10,
            "final_loss": loss,
        }
        results.add("tiny", runner, row)
    rows = {row["runner"]: row for row in summarise(results, ["tiny"], ["raw", "steadyfit", "hf"])}
    assert rows["steadyfit"]["loss_agrees"] and rows["steadyfit"]["vs_raw"] == 2.0
    assert not rows["hf"]["loss_agrees"] and rows["hf"]["cpu_vs_raw"] == 4.0
    table = markdown_table(list(rows.values()))
    assert "| tiny | hf | 4.000 | 4.000–4.000 | 4.00× | – | 2.000 | 4.00× | – | 2.0000 ⚠ |" in table
