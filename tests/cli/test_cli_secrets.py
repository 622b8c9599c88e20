"""Credentials inside run_dir: a run and its resume mask them in every console line, file and logger."""

from __future__ import annotations

import sys
import warnings

import pytest

from steadyfit.cli import EXIT_OK, main
from steadyfit.report import read_metrics
from steadyfit.secrets import find_secrets_in_files

SECRET = "hunter2-sekret"
TOKEN = "ghp_TOKENASUSERNAME0123"


@pytest.fixture(autouse=True)
def _restore_import_path(monkeypatch):
    # `main` puts the current directory on sys.path; each test gets the path back as it was.
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An MLflow SQLite store outside the run directory, so the run's files are searched on their own."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        client = MlflowClient(tracking_uri=uri)
        # Created here, with its artifacts beside the store: MLflow's default root is ./mlruns.
        client.create_experiment("steadyfit", artifact_location=(store.parent / "artifacts").as_uri())
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return client


@pytest.mark.parametrize(
    ("url", "masked_url", "secret"),
    [
        (f"https://bob:{SECRET}@example.com/exp", "https://bob:***@example.com/exp", SECRET),
        (f"https://{TOKEN}@github.com/exp", "https://***@github.com/exp", TOKEN),
    ],
)
def test_credentials_in_run_dir_reach_no_console_line_file_or_logger(
    tmp_path, monkeypatch, capsys, mlflow_store, url, masked_url, secret
):
    pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.chdir(tmp_path)
    fast = ["warmup_ratio=0", "progress=false", "save_every=2", "loggers=csv,tensorboard,mlflow"]
    # pathlib turns runs/https://bob:... into runs/https:/bob:...: the form every path-derived value has.
    for max_steps in (2, 4):  # the second run resumes from the first one's checkpoint
        assert main(["fit", f"run_dir=runs/{url}", f"max_steps={max_steps}", *fast]) == EXIT_OK

    run_dir = tmp_path / "runs" / url.replace("//", "/")
    masked = masked_url.replace("//", "/")
    masked_run_dir = (tmp_path / "runs").resolve() / masked
    out, err = capsys.readouterr()
    assert out.endswith(
        f"steadyfit: run directory runs/{masked_url} (metrics.jsonl, checkpoints/, final/model.safetensors)\n"
    )
    assert secret not in out and secret not in err
    assert f"resumed from runs/{masked}/checkpoints/step-00000002" in err
    leaks = [path.relative_to(run_dir) for path, _ in find_secrets_in_files(tmp_path, [secret])]
    # Only state.json's best_checkpoint, the path a resume loads the best weights from: state, not a log.
    assert {(path.parts[0], path.name) for path in leaks} <= {("checkpoints", "state.json")}
    start = [row for row in read_metrics(run_dir) if row["kind"] == "start"]
    assert [row["resumed_from"] for row in start] == [None, f"runs/{masked}/checkpoints/step-00000002"]

    (run,) = mlflow_store.search_runs([mlflow_store.get_experiment_by_name("steadyfit").experiment_id])
    assert run.info.run_name == "exp"
    assert run.data.tags["steadyfit.run_dir"] == str(masked_run_dir)
    assert run.data.tags["steadyfit.start.resumed_from"] == f"runs/{masked}/checkpoints/step-00000002"
