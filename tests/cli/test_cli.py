"""The command line: exit codes, clear errors without tracebacks, and the digits recipe end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def steadyfit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "steadyfit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "optimizer=adagrad"], "optimizer: got 'adagrad'"),
        (["fit", "learning_rate=1"], "learning_rate: unknown field"),
        (["fit", "missing.yaml"], "missing.yaml: config file not found"),
        (["fit", "no_such_recipe"], "recipe: 'no_such_recipe' is neither a built-in recipe"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_without_traceback(tmp_path, args, expected):
    completed = steadyfit(*args, cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr
    assert expected in completed.stderr
    assert "Traceback" not in completed.stderr


def test_yaml_config_with_overrides(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("recipe: digits\nmax_epochs: 1\nbatch_size: 64\nrun_dir: out\n")
    completed = steadyfit("fit", str(config), "max_steps=3", "progress=false", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 3
    assert "max_steps: 3" in (tmp_path / "out" / "config.yaml").read_text()


@pytest.mark.slow
def test_digits_recipe_reaches_97_percent(tmp_path):
    completed = steadyfit("fit", "run_dir=digits", "progress=false", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    rows = [json.loads(line) for line in (tmp_path / "digits" / "metrics.jsonl").read_text().splitlines()]
    best = max(row["eval_accuracy"] for row in rows if row["kind"] == "eval")
    assert best >= 0.97
    assert (tmp_path / "digits" / "final" / "model.safetensors").stat().st_size > 0


def test_rerunning_a_finished_command_exits_0_and_changes_nothing(tmp_path):
    # Its last checkpoint is at its last step, with an open logging window (log_every=20, 30 steps).
    command = ("fit", "digits", "max_steps=30", "save_every=3", "run_dir=R", "progress=false")
    first = steadyfit(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    weights = (tmp_path / "R" / "final" / "model.safetensors").read_bytes()
    rows = (tmp_path / "R" / "metrics.jsonl").read_text().splitlines()
    again = steadyfit(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "step-00000030" in again.stderr
    assert (tmp_path / "R" / "final" / "model.safetensors").read_bytes() == weights
    after = (tmp_path / "R" / "metrics.jsonl").read_text().splitlines()
    assert _timeless(after) == _timeless(rows), "no row is lost or written twice"


def _timeless(lines: list[str]) -> list[dict]:
    # Start rows describe each attempt (a resumed process writes its own): no part of the trajectory.
    rows = [json.loads(line) for line in lines]
    return [
        {key: value for key, value in row.items() if "time" not in key}
        for row in rows
        if row["kind"] != "start"
    ]


def test_output_into_a_closed_pipe_ends_without_a_traceback(tmp_path):
    # `steadyfit report RUN | head -1`: the reader goes away before we are done writing.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 0.5, "lr": 0.1}\n')
    with subprocess.Popen(
        [sys.executable, "-m", "steadyfit", "report", str(run_dir), "--out", str(tmp_path / "r.png")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as reader_gone:
        reader_gone.stdout.close()
        stderr = reader_gone.stderr.read()
        assert reader_gone.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
