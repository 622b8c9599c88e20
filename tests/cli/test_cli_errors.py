"""User-caused errors on the command line: exit 2 (or one clear line and exit 1), no traceback, no secret
echoed, nothing written outside the run directory. In-process ``main`` where that is what the user runs;
a subprocess where the interpreter's own start-up matters (the import path of a recipe)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steadyfit.assembly import prepare
from steadyfit.checkpoint import RunLock
from steadyfit.cli import EXIT_FAILURE, EXIT_USAGE, main
from steadyfit.config import ConfigError, TrainConfig, make_config
from steadyfit.console import warn

ROOT = Path(__file__).resolve().parents[2]
# A one-step digits run: the cheapest fit that goes through the whole command.
FAST = ["max_steps=1", "warmup_ratio=0", "progress=false"]
SECRET = "hunter2-sekret"


@pytest.fixture(autouse=True)
def _restore_import_path(monkeypatch):
    # `main` puts the current directory on sys.path; each test gets the path back as it was.
    monkeypatch.setattr(sys, "path", list(sys.path))


def fit(capsys, *args: str) -> tuple[int, str]:
    status = main(["fit", *args, *FAST])
    return status, capsys.readouterr().err


def only_error_line(stderr: str) -> str:
    """The message, after checking that it is the one line on stderr and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("steadyfit: error: "), stderr
    return lines[0]


def test_a_run_dir_that_is_a_file_is_refused_and_left_untouched(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("keep me\n")
    status, err = fit(capsys, f"run_dir={path}")
    assert status == EXIT_USAGE
    assert f"run_dir: {path} exists and is not a directory" in only_error_line(err)
    assert path.read_text() == "keep me\n"


def test_an_empty_run_dir_is_refused_instead_of_writing_into_the_current_directory(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    status, err = fit(capsys, "run_dir=''")
    assert status == EXIT_USAGE
    assert "run_dir: must name a directory" in only_error_line(err)
    assert list(tmp_path.iterdir()) == []


def _loop_lock(tmp_path: Path) -> str:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(".lock")  # a link to itself: ELOOP whenever it is followed
    return str(run_dir)


@pytest.mark.parametrize(
    ("make_run_dir", "expected"),
    [
        (lambda tmp_path: "/etc/passwd", "/etc/passwd exists and is not a directory"),
        (lambda tmp_path: "/proc/self", "cannot use /proc/self as a run directory"),
        (_loop_lock, "is a symbolic link, not steadyfit's; remove it"),
    ],
    ids=["etc-passwd", "proc-self", "lock-symlink-loop"],
)
def test_run_dirs_that_cannot_hold_a_run_get_one_line(tmp_path, capsys, make_run_dir, expected):
    run_dir = make_run_dir(tmp_path)
    if not Path(run_dir).exists():
        pytest.skip(f"{run_dir} does not exist on this system")
    status, err = fit(capsys, f"run_dir={run_dir}")
    assert status == EXIT_USAGE
    assert expected in only_error_line(err)


def test_a_seed_too_large_for_numpy_and_torch_names_the_field_and_range(tmp_path, capsys):
    status, err = fit(capsys, f"run_dir={tmp_path / 'run'}", "seed=1180591620717411303424")
    assert status == EXIT_USAGE
    assert "seed: must be an integer from 0 to 4294967295" in only_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay"])
def test_infinite_lr_and_weight_decay_are_refused_on_the_command_line(tmp_path, capsys, field):
    status, err = fit(capsys, f"run_dir={tmp_path / 'run'}", f"{field}=.inf")
    assert status == EXIT_USAGE
    assert f"{field}: Input should be a finite number" in only_error_line(err)


def test_every_float_field_refuses_inf_and_nan():
    defaults = TrainConfig()
    floats = [
        name
        for name, info in TrainConfig.model_fields.items()
        if "float" in str(info.annotation) and "dict" not in str(info.annotation)
    ]
    assert {"lr", "weight_decay", "max_grad_norm", "gamma", "early_stopping_threshold"} <= set(floats)
    for name in floats:
        for bad in (math.inf, -math.inf, math.nan):
            value = (0.9, bad) if name == "betas" else bad
            with pytest.raises(ConfigError, match=name):
                make_config({**defaults.model_dump(), name: value})


@pytest.mark.parametrize(
    ("override", "expected"),
    [("loggers=tensorboard", ["tensorboard"]), ("loggers=csv,tensorboard", ["csv", "tensorboard"])],
)
def test_loggers_accepts_one_name_or_comma_separated_names(override, expected):
    _, config = prepare(None, [override])  # how `steadyfit fit` reads its key=value arguments
    assert config.loggers == expected


RECIPES = """
from steadyfit.recipes import digits

def good(config):
    return digits.build(config)

def bad(config):
    return 42
"""


def test_a_recipe_in_the_current_directory_is_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "local_recipes_ok.py").write_text(RECIPES)
    monkeypatch.chdir(tmp_path)
    status, err = fit(capsys, "local_recipes_ok:good", "run_dir=run")
    assert status == 0, err
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_a_relative_recipe_module_is_a_usage_error(capsys):
    assert main(["fit", ".recipes:build"]) == EXIT_USAGE
    assert "recipe: '.recipes:build' names a relative module" in capsys.readouterr().err


def test_a_recipe_returning_something_else_names_the_recipe_and_the_value(tmp_path):
    (tmp_path / "local_recipes_bad.py").write_text(RECIPES)
    # -P: no current directory on sys.path, as under the `steadyfit` console script users run.
    completed = subprocess.run(
        [sys.executable, "-P", "-m", "steadyfit", "fit", "local_recipes_bad:bad", "run_dir=run", *FAST],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == EXIT_USAGE
    assert "recipe: 'local_recipes_bad:bad' returned 42 (int)" in only_error_line(completed.stderr)


def test_a_password_in_a_resume_url_is_not_echoed(tmp_path, capsys):
    status, err = fit(capsys, f"run_dir={tmp_path / 'run'}", f"resume=https://bob:{SECRET}@example.com/ckpt")
    assert status == EXIT_USAGE
    assert "https://bob:***@example.com/ckpt" in only_error_line(err)
    assert SECRET not in err


@pytest.mark.parametrize(
    "uri",
    [
        f"http://bob:{SECRET}@127.0.0.1:9/",
        f"http://ghp_{SECRET}0123@127.0.0.1:9/",  # a token as the user name
        f"http://bob:p@{SECRET}@127.0.0.1:9/",  # an unencoded "@" in the password
    ],
)
def test_a_password_in_mlflow_tracking_uri_is_not_echoed(tmp_path, monkeypatch, capsys, uri):
    pytest.importorskip("mlflow")
    # Port 9 (discard) refuses at once on this host; no retries, so the failure is immediate.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    status, err = fit(capsys, f"run_dir={tmp_path / 'run'}", "loggers=mlflow")
    assert status == EXIT_FAILURE
    assert "loggers: the mlflow logger could not start" in only_error_line(err)
    assert SECRET not in err


def test_an_unexpected_error_prints_its_traceback_with_secrets_masked(monkeypatch, capsys):
    def broken(source, overrides):
        raise RuntimeError(f"cannot reach postgresql://bob:{SECRET}@db/runs")

    monkeypatch.setattr("steadyfit.cli.run_fit", broken)
    assert main(["fit"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" in err and "postgresql://bob:***@db/runs" in err
    assert SECRET not in err


def test_lr_find_refuses_a_run_directory_another_run_holds(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        status = main(["lr-find", f"run_dir={run_dir}", "--num-steps", "5"])
    assert status == EXIT_USAGE
    assert "is held" in only_error_line(capsys.readouterr().err)
    assert not (run_dir / "lr_find.png").exists()


def test_a_final_that_is_a_link_is_refused_before_training(tmp_path, capsys):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    elsewhere.mkdir()
    (run_dir / "final").symlink_to(elsewhere)
    status, err = fit(capsys, f"run_dir={run_dir}")
    assert status == EXIT_USAGE
    assert f"{run_dir / 'final'} is a link or a file" in only_error_line(err)
    assert list(elsewhere.iterdir()) == []
    assert not (run_dir / "checkpoints").exists(), "refused before training, not after"


def test_notices_and_warnings_mask_secrets(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    warn(f"could not reach https://bob:{SECRET}@hub.example.com?token={SECRET}")
    err = capsys.readouterr().err
    assert "https://bob:***@hub.example.com?token=***" in err
    assert SECRET not in err


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", "checkpoints"])
def test_a_run_directory_file_in_the_way_is_named_before_training(tmp_path, capsys, name):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if name == "checkpoints":
        (run_dir / name).write_text("not a directory")
    else:
        (run_dir / name).mkdir()
    status, err = fit(capsys, f"run_dir={run_dir}")
    assert status == EXIT_USAGE
    assert name in only_error_line(err)
