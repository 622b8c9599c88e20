"""Sweeps: better than the default on digits, pruned trials marked, a killed sweep resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steadyfit.assembly import train
from steadyfit.config import ConfigError

optuna = pytest.importorskip("optuna")

from steadyfit.sweep import read_space, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPACE = {
    "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
}
# Tiny budgets: the comparison with the default config is made under the same budget.
BUDGET = ["max_steps=30", "eval_every=10"]
SWEEP_SCRIPT = """
import sys
from steadyfit.sweep import run_sweep
run_sweep("digits", sys.argv[1], int(sys.argv[2]), sys.argv[3], overrides=sys.argv[4:])
"""


def write_space(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_space_errors_name_the_file_and_parameter(tmp_path):
    with pytest.raises(ConfigError, match=r"space\.yaml: lrate: not a TrainConfig field"):
        read_space(write_space(tmp_path, {"lrate": {"type": "float", "low": 1e-4, "high": 1e-1}}))
    with pytest.raises(ConfigError, match=r"lr: needs numbers low < high"):
        read_space(write_space(tmp_path, {"lr": {"type": "float", "low": 0.1, "high": 0.01}}))
    with pytest.raises(ConfigError, match=r"batch_size: categorical needs a non-empty 'choices' list"):
        read_space(write_space(tmp_path, {"batch_size": {"type": "categorical"}}))
    (tmp_path / "yaml11.yaml").write_text("lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n")
    assert read_space(tmp_path / "yaml11.yaml")["lr"]["low"] == 1e-4  # '1e-4' is a number, not a string


@pytest.mark.slow
def test_six_trials_beat_the_default_and_pruned_trials_are_marked(tmp_path):
    _, baseline = train("digits", [f"run_dir={tmp_path / 'default'}", "progress=false", *BUDGET])
    sweep_dir = tmp_path / "sweep"
    study = run_sweep("digits", str(write_space(tmp_path, SPACE)), 6, str(sweep_dir), overrides=BUDGET)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # metric_for_best: accuracy
    assert study.best_value >= baseline.best_metric
    states = {trial.number: trial.state for trial in study.trials}
    assert len(states) == 6
    pruned = [n for n, state in states.items() if state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the median pruner stopped no trial"
    table = (sweep_dir / "results.md").read_text()
    for number in pruned:
        assert f"| {number} |" in table.split(f"trial-{number:04d}")[0].splitlines()[-1]
        assert f"| pruned | trial-{number:04d} |" in table
        summary = (sweep_dir / f"trial-{number:04d}" / "metrics.jsonl").read_text()
        assert "pruned by the sweep" in summary
    assert f"complete (best) | trial-{study.best_trial.number:04d} |" in table
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    assert read_space(sweep_dir / "space.yaml") == SPACE
    settings = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert settings["sampler"]["name"] == "TPESampler" and settings["pruner"]["name"] == "MedianPruner"


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    script = tmp_path / "sweep_script.py"
    script.write_text(SWEEP_SCRIPT)
    space = str(write_space(tmp_path, SPACE))
    sweep_dir = tmp_path / "sweep"
    # No periodic evaluation (nothing to prune) but periodic checkpoints: the interrupted trial can resume.
    args = [
        sys.executable,
        str(script),
        space,
        "4",
        str(sweep_dir),
        "max_steps=20",
        "eval_every=0",
        "save_every=10",
        "load_best_at_end=false",
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in child.stdout:
        seen.append(line)
        # Killed inside trial 3, after it committed a checkpoint.
        if "trial 3 checkpoint" in line:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "".join(seen)
    finished = {n: (sweep_dir / f"trial-{n:04d}" / "metrics.jsonl").read_bytes() for n in range(3)}

    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=True)
    study = optuna.load_study(study_name="steadyfit-sweep", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    by_number = {trial.number: trial for trial in study.trials}
    complete = [n for n, trial in by_number.items() if trial.state == optuna.trial.TrialState.COMPLETE]
    assert complete == [0, 1, 2, 4]
    assert by_number[3].state == optuna.trial.TrialState.FAIL
    assert by_number[4].params == by_number[3].params
    assert by_number[4].user_attrs["run_dir"] == by_number[3].user_attrs["run_dir"]
    assert "trial 4 resumed its run at step" in rerun.stdout
    for number in range(3):  # not rerun: their run directories are untouched
        assert (sweep_dir / f"trial-{number:04d}" / "metrics.jsonl").read_bytes() == finished[number]
        assert f"trial {number} started" not in rerun.stdout
    assert "(resumes 3)" in (sweep_dir / "results.md").read_text()
