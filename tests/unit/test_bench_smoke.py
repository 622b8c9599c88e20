"""The benchmarks in bench/ run end to end (smoke mode) and their bookkeeping is right; no timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from overhead import (
    CORE_RUNNERS,
    JOBS,
    SLOW_TO_START_JOBS,
    Measurements,
    StepClock,
    make_job,
    markdown_table,
    summarise,
    token_mean,
)
from steadyfit.recipes.tinylm import lm_loss

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
    smoke_jobs = [job for job in JOBS if job not in SLOW_TO_START_JOBS]
    # lm_compiled stays out of CI (a cold torch.compile of the LM takes ~35 s); lm itself is in.
    assert "lm" in smoke_jobs and not any(job in SLOW_TO_START_JOBS for job, _ in rows)
    for job in smoke_jobs:
        spec = make_job(job, smoke=True)
        for runner in CORE_RUNNERS:
            row = rows[(job, runner)]
            if job == "workers" and runner == "raw":
                assert "skipped" in row  # the in-memory floor has no __getitem__ to measure
                continue
            assert f"| {job} | {runner} |" in proc.stdout
            # The step clock saw every optimizer step of the job, no more: the timing covers the whole loop.
            assert row["steps"] == spec.max_steps
            assert math.isfinite(row["final_loss"])
            assert row["loss_agrees"], (job, runner, row["final_loss"])
            # Tokens per second for the language model only: a step trains batch_size windows of 128 tokens.
            expected_tokens = spec.batch_size * 128 / row["median_s"] if job == "lm" else None
            assert row["tokens_per_s"] == expected_tokens


def test_checkpoint_smoke_prints_every_operation(tmp_path: Path) -> None:
    report_path = tmp_path / "checkpoint.json"
    proc = run_bench("checkpoint.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report_path.read_text())["summary"]
    for operation in (
        "torch.save",
        "torch.save + fsync",
        "torch.load",
        "torch.load, fresh process",
        "steadyfit save",
        "steadyfit load",
        "steadyfit load, fresh process",
        "steadyfit async, blocked",
        "steadyfit async, blocked (everything at submit)",
        "steadyfit async, total",
        "training step, no save",
        "training step, save in flight",
        "training step, save in flight (everything at submit)",
    ):
        assert f"| {operation} |" in proc.stdout
        assert summary[operation]["min_s"] <= summary[operation]["median_s"] <= summary[operation]["max_s"]
    assert "Targets:" in proc.stdout


def test_checkpoint_handoff_smoke_times_both_ways(tmp_path: Path) -> None:
    report_path = tmp_path / "handoff.json"
    proc = run_bench("checkpoint.py", "--handoff", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(report_path.read_text())["handoff"]
    assert row["width"] == 64 and row["state_bytes"] > 0
    assert row["at_submit_s"] > 0 and row["deferred_s"] > 0
    assert "| 64 |" in proc.stdout


def test_eval_workers_smoke_times_both_eval_loaders(tmp_path: Path) -> None:
    report_path = tmp_path / "eval_workers.json"
    proc = run_bench("eval_workers.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    for name in ("fresh workers at every evaluation", "kept workers (persistent_workers=true)"):
        assert f"| {name} |" in proc.stdout
        (fit,) = report["samples"][name]
        assert fit["evaluations"] == len(fit["eval_losses"]) == 2  # every evaluation of the fit was timed
    # The script itself refuses settings that evaluate differently; the losses it compared are these.
    losses = [report["samples"][name][0]["eval_losses"] for name in report["samples"]]
    assert losses[0] == losses[1]


def test_optimizer_step_smoke_times_every_setting(tmp_path: Path) -> None:
    report_path = tmp_path / "steps.json"
    proc = run_bench("optimizer_step.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(report_path.read_text())["settings"]
    assert len(settings) == 4 and "tensor lr + found_inf (steadyfit's device-side skip)" in settings
    for name, numbers in settings.items():
        assert f"| {name} |" in proc.stdout
        assert 0 < numbers["min_us"] <= numbers["median_us"]


def test_instructions_smoke_runs_both_counted_loops(tmp_path: Path) -> None:
    report_path = tmp_path / "instructions.json"
    proc = run_bench("instructions.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    assert "| runner | instructions per step | vs raw |" in proc.stdout
    assert set(json.loads(report_path.read_text())["runs"]) == {"raw", "steadyfit"}


def test_instructions_reads_callgrinds_count() -> None:
    from instructions import collected_instructions

    output = "==41== Events    : Ir\n==41== Collected : 10621826711\n==41==\n==41== I   refs:      10,621"
    assert collected_instructions(output) == 10_621_826_711


def test_worker_transfer_smoke_measures_both_paths(tmp_path: Path) -> None:
    report_path = tmp_path / "transfer.json"
    proc = run_bench("worker_transfer.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(report_path.read_text())["rows"]
    assert [(row["bytes"], row["path"]) for row in rows] == [
        (size, path) for size in (8 << 10, 4 << 20) for path in ("shared memory", "by value")
    ]
    assert all(row["wall_us"] > 0 for row in rows) and "| 4096 KiB | by value |" in proc.stdout


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


def test_lm_job_trains_the_tinylm_recipe_on_learnable_tokens() -> None:
    job = make_job("lm", smoke=True)
    inputs, targets = job.train_data.tensors
    # Next-token windows: each target window is its input window shifted by one.
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert job.loss_fn is lm_loss and job.tokens_per_sample == inputs.shape[1] == 128
    # Whole batches only, so a compiled model sees one shape.
    assert len(targets) % job.batch_size == 0 and not job.compile and make_job("lm_compiled").compile
    # Every token has at most 4 successors: the chain has far less than ln 256 nats of entropy to learn.
    pairs = torch.stack([inputs.flatten(), targets.flatten()], dim=1).unique(dim=0)
    assert torch.bincount(pairs[:, 0]).max() <= 4


def test_hand_written_loops_backpropagate_the_token_mean_of_the_recipe_loss() -> None:
    logits = torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    targets[1, 3:] = -100  # padding the loss leaves out: the mean is over the 8 counted tokens
    total, count = lm_loss(logits, targets)
    assert int(count) == 8
    assert torch.equal(token_mean(lm_loss)(logits, targets), total / count)
    # A scalar-mean loss passes through unchanged.
    labels = torch.tensor([1, 2])
    assert torch.equal(
        token_mean(torch.nn.functional.cross_entropy)(logits[:, 0], labels),
        torch.nn.functional.cross_entropy(logits[:, 0], labels),
    )


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
    assert "| tiny | hf | 4.000 | 4.000–4.000 | 4.00× | – | 2.000 | 4.00× | – | 2.0000 ⚠ | – |" in table


def test_summary_reports_tokens_per_second_for_a_language_model_job() -> None:
    results = Measurements()
    for runner, seconds in (("raw", 0.2), ("steadyfit", 0.25)):
        row = {
            "seconds_per_step": seconds,
            "cpu_seconds_per_step": seconds,
            "steps": 100,
            "final_loss": 3.0,
            "tokens_per_step": 4096,
        }
        results.add("lm", runner, row)
    rows = {row["runner"]: row for row in summarise(results, ["lm"], ["raw", "steadyfit"])}
    # Tokens of a step over the median wall time of a step: 4096 / 0.25 s.
    assert rows["steadyfit"]["tokens_per_s"] == 16384.0 and rows["raw"]["tokens_per_s"] == 20480.0
    assert "| 3.0000 | 16,384 |" in markdown_table(list(rows.values()))


def test_ops_smoke_counts_operators_of_both_loops(tmp_path: Path) -> None:
    report_path = tmp_path / "ops.json"
    proc = run_bench("ops.py", "--smoke", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    per_step = json.loads(report_path.read_text())["per_step"]
    # Both loops run a forward, a backward and an optimizer step on every step: dozens of operators each.
    assert per_step["raw"]["top_level"] > 20 and per_step["steadyfit"]["top_level"] > 20
    assert "| top-level operator | steadyfit − raw |" in proc.stdout
