"""Sweeps: better than the default on digits, pruned trials marked, a killed sweep resumes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_bitwise_equal, final_weights
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
    with pytest.raises(ConfigError, match=r"space\.yaml: lrate: unknown field \(did you mean"):
        read_space(write_space(tmp_path, {"lrate": {"type": "float", "low": 1e-4, "high": 1e-1}}))
    with pytest.raises(ConfigError, match=r"space\.yaml: learning_rate: .* is steadyfit's `lr`"):
        read_space(write_space(tmp_path, {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1}}))
    with pytest.raises(
        ConfigError, match=r"space\.yaml: run_dir: not a TrainConfig field that a sweep can vary"
    ):
        read_space(write_space(tmp_path, {"run_dir": {"type": "categorical", "choices": ["a", "b"]}}))
    # A value no trial could run with is refused before the first trial, not by each trial that draws it.
    with pytest.raises(ConfigError, match=r"space\.yaml: optimizer: got 'adamx'; allowed values: "):
        read_space(
            write_space(tmp_path, {"optimizer": {"type": "categorical", "choices": ["adamw", "adamx"]}})
        )
    with pytest.raises(ConfigError, match=r"space\.yaml: lr: Input should be greater than 0 \(got 0"):
        read_space(write_space(tmp_path, {"lr": {"type": "float", "low": 0, "high": 0.1}}))
    with pytest.raises(ConfigError, match=r"precision: .* Lightning's precision 'bf16-mixed' is steadyfit's"):
        read_space(write_space(tmp_path, {"precision": {"type": "categorical", "choices": ["bf16-mixed"]}}))
    with pytest.raises(ConfigError, match=r"lr: needs numbers low < high"):
        read_space(write_space(tmp_path, {"lr": {"type": "float", "low": 0.1, "high": 0.01}}))
    with pytest.raises(ConfigError, match=r"batch_size: categorical needs a non-empty 'choices' list"):
        read_space(write_space(tmp_path, {"batch_size": {"type": "categorical"}}))
    with pytest.raises(ConfigError, match=r"metric_for_best: not a TrainConfig field .* the objective"):
        read_space(write_space(tmp_path, {"metric_for_best": {"type": "categorical", "choices": ["a"]}}))
    with pytest.raises(ConfigError, match=r"greater_is_better: not a TrainConfig field .* direction"):
        read_space(write_space(tmp_path, {"greater_is_better": {"type": "categorical", "choices": [True]}}))
    with pytest.raises(ConfigError, match=r"lr: log: true and step exclude each other"):
        read_space(
            write_space(
                tmp_path, {"lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True, "step": 0.01}}
            )
        )
    with pytest.raises(ConfigError, match=r"batch_size: step must be a number > 0 \(got 0\)"):
        read_space(write_space(tmp_path, {"batch_size": {"type": "int", "low": 8, "high": 64, "step": 0}}))
    (tmp_path / "yaml11.yaml").write_text("lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n")
    assert read_space(tmp_path / "yaml11.yaml")["lr"]["low"] == 1e-4  # '1e-4' is a number, not a string


def test_a_sweep_directory_refuses_another_objective_before_anything_runs(tmp_path):
    # Optuna's stored study keeps its first direction: values of another metric would be ranked with it.
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump({"metric": "eval_loss", "direction": "minimize"}))
    with pytest.raises(
        ConfigError, match=r"ranks its trials by eval_loss \(minimize\), this command by eval_acc"
    ):
        run_sweep("digits", str(write_space(tmp_path, SPACE)), 2, str(sweep_dir))
    assert sorted(path.name for path in sweep_dir.iterdir()) == ["sweep.yaml"]


def test_a_recipe_without_eval_data_is_refused_before_the_first_trial(tmp_path, monkeypatch):
    import steadyfit.sweep as sweep_module
    from steadyfit.recipes import build_recipe

    def without_eval(name, config):
        recipe = build_recipe(name, config)
        recipe.eval_data = None
        return recipe

    monkeypatch.setattr(sweep_module, "build_recipe", without_eval)
    with pytest.raises(ConfigError, match="has no eval data, and every trial is ranked by its evaluation"):
        run_sweep("digits", str(write_space(tmp_path, SPACE)), 2, str(tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()


def test_workers_run_from_another_thread_install_no_signal_handler(tmp_path):
    # signal.signal works in the main thread alone: run_sweep(workers=2) from a thread must still run.
    import threading

    from steadyfit.sweep import _run_workers

    errors = []

    def run():
        try:
            _run_workers("sqlite:///unused.db", 0, None, [], tmp_path)
        except Exception as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert errors == []


def _processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (a test's own children and theirs)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the workers")
def test_sigterm_to_a_sweep_with_workers_stops_them_with_checkpoints_and_the_rerun_resumes(tmp_path):
    space = write_space(tmp_path, {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}})
    marker = f"STEADYFIT_SWEEP_TEST={os.getpid()}-{tmp_path.name}"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), marker.split("=")[0]: marker.split("=")[1]}
    args = [
        sys.executable,
        "-m",
        "steadyfit",
        "sweep",
        "digits",
        "--space",
        str(space),
        "--trials",
        "2",
        "--workers",
        "2",
        "--dir",
        str(tmp_path / "sw"),
        "max_steps=200",
        "eval_every=0",
        "save_every=5",
        "load_best_at_end=false",
    ]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in child.stdout:
        seen.append(line)
        if " checkpoint " in line:
            child.send_signal(signal.SIGTERM)  # the parent alone, as a scheduler signals the main process
            break
    rest, _ = child.communicate(timeout=120)
    output = "".join(seen) + rest
    assert child.returncode == 143, output
    assert "queued again" in output
    assert _processes_with(marker) == [], "a worker outlived the sweep"
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resumed its run at step" in rerun.stdout


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


@pytest.mark.slow
def test_the_documented_command_prints_the_best_trial_and_a_rerun_that_gives_its_weights(
    tmp_path, capsys, monkeypatch
):
    from steadyfit.cli import main

    monkeypatch.chdir(tmp_path)
    write_space(tmp_path, SPACE)
    # The form docs/sweeps.md shows: the config overrides after the options.
    argv = ["sweep", "digits", "--space", "space.yaml", "--trials", "2", "--dir", "sw", "max_steps=12"]
    assert main([*argv, "eval_every=6"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="steadyfit-sweep", storage=f"sqlite:///{tmp_path / 'sw/study.db'}")
    assert [trial.state for trial in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    best = study.best_trial
    assert f"sweep: best trial {best.number}: eval_accuracy={best.value:.6g}" in out
    assert "sweep: best params: " + ", ".join(f"{k}={v!r}" for k, v in best.params.items()) in out
    rerun = next(line for line in out.splitlines() if line.startswith("sweep: rerun it: "))
    words = shlex.split(rerun.removeprefix("sweep: rerun it: "))
    assert words[:3] == ["steadyfit", "fit", "digits"] and "max_steps=12" in words
    assert words[-1] == "run_dir=sw/best"
    assert rerun.removeprefix("sweep: ") in (tmp_path / "sw" / "results.md").read_text()
    assert main(words[1:]) == 0
    assert_bitwise_equal(
        final_weights(tmp_path / "sw" / "best"), final_weights(tmp_path / "sw" / f"trial-{best.number:04d}")
    )


def test_a_sweep_whose_every_trial_failed_exits_1(tmp_path, capsys, monkeypatch):
    from steadyfit.cli import EXIT_FAILURE, main

    monkeypatch.chdir(tmp_path)
    # Each value is one nesterov takes, but not with the config's adamw: every trial fails its config.
    write_space(tmp_path, {"nesterov": {"type": "categorical", "choices": [True]}})
    argv = ["sweep", "digits", "--space", "space.yaml", "--trials", "2", "--dir", "sw", "max_steps=4"]
    assert main(argv) == EXIT_FAILURE
    assert "sweep: no trial completed yet" in capsys.readouterr().out


def test_overrides_are_taken_before_and_after_the_options():
    from steadyfit.cli import build_parser, parse_arguments

    parser = build_parser()
    after = parse_arguments(
        parser, ["sweep", "digits", "--space", "s.yaml", "--trials", "2", "lr=0.1", "seed=3"]
    )
    before = parse_arguments(
        parser, ["sweep", "digits", "lr=0.1", "--space", "s.yaml", "--trials", "2", "seed=3"]
    )
    first = parse_arguments(
        parser, ["sweep", "lr=0.1", "digits", "--space", "s.yaml", "--trials", "2", "seed=3"]
    )
    assert after.source == before.source == first.source == "digits"
    assert after.overrides == before.overrides == first.overrides == ["lr=0.1", "seed=3"]
    last = parse_arguments(
        parser, ["sweep", "lr=0.1", "--space", "s.yaml", "--trials", "2", "digits", "seed=3"]
    )
    assert (last.source, last.overrides) == ("digits", ["lr=0.1", "seed=3"])
    lr_find = parse_arguments(parser, ["lr-find", "run_dir=x", "--num-steps", "5", "tinylm"])
    assert (lr_find.source, lr_find.overrides) == ("tinylm", ["run_dir=x"])
    fit = parse_arguments(parser, ["fit", "max_steps=3", "digits", "seed=1"])
    assert (fit.source, fit.overrides) == ("digits", ["max_steps=3", "seed=1"])
    assert parse_arguments(parser, ["fit", "max_steps=3"]).source is None
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["fit", "digits", "max_steps=3", "tinylm"])
    lr_find = parse_arguments(parser, ["lr-find", "digits", "--num-steps", "5", "max_steps=9"])
    assert lr_find.num_steps == 5 and lr_find.overrides == ["max_steps=9"]
    with pytest.raises(SystemExit):
        parse_arguments(parser, ["sweep", "digits", "--space", "s.yaml", "--trials", "2", "--bogus"])


def test_the_plot_shows_every_trial_on_integer_ticks_with_pruned_ones_marked():
    pytest.importorskip("matplotlib")
    from optuna.distributions import FloatDistribution

    from steadyfit.sweep import sweep_figure

    study = optuna.create_study(direction="minimize")
    lr = {"lr": FloatDistribution(1e-4, 1.0, log=True)}
    TrialState = optuna.trial.TrialState
    for number, (state, value) in enumerate(
        [
            (TrialState.COMPLETE, 0.5),
            (TrialState.PRUNED, 0.9),
            (TrialState.COMPLETE, 0.3),
            (TrialState.FAIL, None),
        ]
    ):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=value if state == TrialState.COMPLETE else None,
                params={"lr": 0.01 * (number + 1)},
                distributions=lr,
                intermediate_values={5: 0.8, 10: value} if state == TrialState.PRUNED else {},
            )
        )
    figure = sweep_figure(study, "eval_loss")
    axes = figure.axes[0]
    points = {collection.get_label(): collection.get_offsets().tolist() for collection in axes.collections}
    assert points["completed"] == [[0.0, 0.5], [2.0, 0.3]]
    assert points["pruned (last value)"] == [[1.0, 0.9]]
    lines = {line.get_label(): line for line in axes.lines}
    assert list(lines["failed"].get_xdata()) == [3]
    assert list(lines["best so far"].get_ydata()) == [0.5, 0.3]
    assert all(float(tick).is_integer() for tick in axes.get_xticks())
