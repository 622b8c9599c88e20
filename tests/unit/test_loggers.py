"""Extra loggers against the real tools: files read back with each tool's own reader."""

from __future__ import annotations

import csv
import shutil
import sys
import time
import warnings

import pytest

from steadyfit.config import ConfigError
from steadyfit.loggers.csv import CSVLogger
from steadyfit.loggers.registry import build_loggers, row_kind, scalars
from steadyfit.secrets import MASK, find_secrets_in_files

SECRET = "hunter22-SECRET"
CONFIG = {
    "lr": 0.001,
    "batch_size": 32,
    "betas": [0.9, 0.999],
    "hf_token": SECRET,
    "data_url": f"https://ann:{SECRET}@data.example.com/digits",
    "metric_for_best": None,
}
# A start-up summary: it describes the run, so no logger plots it.
START = {"kind": "start", "step": 0, "parameters": 163, "device": "cpu", "resumed_from": None, "time_s": 0.0}
ROWS = [
    {"kind": "train", "step": 10, "epoch": 0, "loss": 0.75, "lr": 0.001, "grad_norm": 1.5, "time_s": 1.0},
    {"kind": "train", "step": 20, "epoch": 0, "loss": 0.5, "lr": 0.001, "grad_norm": 1.25, "time_s": 2.0},
    {"kind": "eval", "step": 20, "epoch": 0, "eval_loss": 0.625, "eval_accuracy": 0.875, "time_s": 2.5},
    {"kind": "diagnostic", "step": 20, "diagnostic": "nonfinite", "message": "skipped step 15"},
    {"kind": "train", "step": 30, "epoch": 1, "loss": 0.25, "lr": 0.0005, "grad_norm": 1.0, "time_s": 3.0},
]


def test_scalars_name_tags_by_kind_and_drop_the_kind_prefix():
    assert scalars(ROWS[0]) == {
        "train/epoch": 0.0,
        "train/loss": 0.75,
        "train/lr": 0.001,
        "train/grad_norm": 1.5,
        "train/time_s": 1.0,
    }
    assert scalars(ROWS[2]) == {
        "eval/epoch": 0.0,
        "eval/loss": 0.625,
        "eval/accuracy": 0.875,
        "eval/time_s": 2.5,
    }
    assert scalars({"step": 1, "flag": True, "note": "x", "values": [1]}) == {}
    assert scalars(START) == {}


def test_row_kind_falls_back_on_eval_keys():
    assert [row_kind(row) for row in ({"step": 1, "loss": 1.0}, {"step": 1, "eval_loss": 1.0}, ROWS[3])] == [
        "train",
        "eval",
        "diagnostic",
    ]


def test_build_loggers_skips_jsonl_drops_duplicates_and_refuses_unknown_names(tmp_path):
    loggers = build_loggers(["jsonl", "csv", "csv"], str(tmp_path), CONFIG)

    assert [type(logger) for logger in loggers] == [CSVLogger]
    with pytest.raises(ConfigError, match=r"unknown logger 'neptune'.*csv, tensorboard, mlflow, wandb"):
        build_loggers(["neptune"], str(tmp_path), CONFIG)


@pytest.mark.parametrize(
    ("name", "module"),
    [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")],
)
def test_a_missing_optional_library_names_the_extra_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is absent

    with pytest.raises(ConfigError, match=rf"pip install steadyfit\[{name}\]"):
        build_loggers([name], str(tmp_path), CONFIG)


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_writes_one_file_per_kind_and_grows_the_header_for_new_keys(tmp_path):
    logger = CSVLogger(str(tmp_path), CONFIG)
    logger.log_params(CONFIG)
    for row in ROWS:
        logger.log_row(row)
    logger.log_row({"kind": "train", "step": 40, "loss": 0.125, "loss_scale": 1024.0, "extra": [1, 2]})
    logger.close()

    train = _read_csv(tmp_path / "metrics_train.csv")
    assert [row["step"] for row in train] == ["10", "20", "30", "40"]
    assert [float(row["loss"]) for row in train] == [0.75, 0.5, 0.25, 0.125]
    assert train[0]["loss_scale"] == "" and train[3]["loss_scale"] == "1024.0"
    assert train[3]["extra"] == "[1, 2]" and train[3]["lr"] == ""
    assert _read_csv(tmp_path / "metrics_eval.csv") == [
        {"step": "20", "epoch": "0", "eval_loss": "0.625", "eval_accuracy": "0.875", "time_s": "2.5"}
    ]
    assert _read_csv(tmp_path / "metrics_diagnostic.csv")[0]["message"] == "skipped step 15"


def test_csv_resumed_logger_appends_under_the_existing_header(tmp_path):
    first = CSVLogger(str(tmp_path), CONFIG)
    first.log_row(ROWS[0])
    first.close()

    second = CSVLogger(str(tmp_path), CONFIG)
    second.log_row(ROWS[1])
    second.log_row({"kind": "train", "step": 30, "loss": 0.25, "tokens_per_sec": 100.0})
    second.close()

    lines = (tmp_path / "metrics_train.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr,grad_norm,time_s,tokens_per_sec"
    assert [row["step"] for row in _read_csv(tmp_path / "metrics_train.csv")] == ["10", "20", "30"]


def test_csv_of_a_resumed_run_holds_each_step_once(tmp_path):
    # The interrupted run logged steps 5 and 6 after its step-4 checkpoint; metrics.jsonl is cut back to the
    # checkpoint's rows on resume, and so must the CSV files be, or steps 5 and 6 appear twice.
    import torch.nn.functional as F

    from helpers import base_config, make_mlp, make_regression
    from steadyfit import Callback, Trainer

    class CrashAt(Callback):
        def on_step_end(self, trainer, state):
            if state.step == 6:
                raise RuntimeError("crash")

    def fit(name, callbacks=()):
        config = base_config(
            tmp_path, run_dir=str(tmp_path / name), batch_size=8, max_epochs=2, save_every=4, eval_every=2,
            loggers=["csv"],
        )  # fmt: skip
        data = make_regression(48)
        Trainer(
            make_mlp(), config, train_data=data, eval_data=data, loss_fn=F.cross_entropy, callbacks=callbacks
        ).fit()

    fit("clean")
    with pytest.raises(RuntimeError, match="crash"):
        fit("resumed", [CrashAt()])
    fit("resumed")
    for kind in ("train", "eval"):
        clean, resumed = (_read_csv(tmp_path / name / f"metrics_{kind}.csv") for name in ("clean", "resumed"))
        steps = [row["step"] for row in resumed]
        assert steps == [row["step"] for row in clean] and len(set(steps)) == len(steps), kind
        assert [row["loss" if kind == "train" else "eval_loss"] for row in resumed] == [
            row["loss" if kind == "train" else "eval_loss"] for row in clean
        ]


def test_tensorboard_scalars_and_hparams_read_back_with_tensorboards_reader(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    env_secret = "env-only-credential-9"
    monkeypatch.setenv("SERVICE_ACCESS_TOKEN", env_secret)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (logger,) = build_loggers(["tensorboard"], str(tmp_path), CONFIG)
    logger.log_params({**CONFIG, "note": f"pushed with {env_secret}"})
    for row in [START, *ROWS]:
        logger.log_row(row)
    logger.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert loss == [(10, 0.75), (20, 0.5), (30, 0.25)]
    assert [(event.step, event.value) for event in events.Scalars("eval/accuracy")] == [(20, 0.875)]
    assert {"train/lr", "train/grad_norm", "eval/loss"} <= set(events.Tags()["scalars"])
    assert not any(tag.startswith("start/") for tag in events.Tags()["scalars"])
    assert set(events.Tags()["tensors"]) == {
        "config/text_summary",
        "start/text_summary",
        "diagnostic/nonfinite/text_summary",
    }
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == 0.001 and hparams["hf_token"].string_value == MASK
    assert hparams["note"].string_value == "pushed with ***"
    assert find_secrets_in_files(tmp_path, [SECRET, env_secret]) == []


def test_tensorboard_resumed_run_replaces_the_steps_it_repeats(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = build_loggers(["tensorboard"], str(tmp_path), CONFIG)[0]
    for step in (10, 20, 30):
        first.log_row({"kind": "train", "step": step, "loss": float(step)})
    first.close()
    # Killed after step 30, resumed from the checkpoint at step 20: steps 30 and 40 come again. The resumed
    # run's start row, at the checkpoint's step, keeps that step's rows.
    second = build_loggers(["tensorboard"], str(tmp_path), CONFIG)[0]
    second.log_row({**START, "step": 20, "resumed_from": "checkpoints/step-00000020"})
    for step in (30, 40):
        second.log_row({"kind": "train", "step": step, "loss": step / 10})
    second.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (10, 10.0),
        (20, 20.0),
        (30, 3.0),
        (40, 4.0),
    ]


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory):
    """An MLflow SQLite store with its tables created: creating them takes seconds of SQLite writes."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with warnings.catch_warnings():
        # SQLAlchemy 2.1 deprecates a loader strategy MLflow's models use; nothing to act on here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_env(monkeypatch, empty_mlflow_db):
    """No MLflow variables from the outside; ``copy_db(path)`` puts a ready store at ``path``."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)

    def copy_db(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(empty_mlflow_db, path)

    return monkeypatch, copy_db


def test_mlflow_sqlite_store_holds_redacted_params_metrics_by_step_and_the_artifact(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "digits-run"
    mlflow_env[1](run_dir / "mlflow.db")
    (logger,) = build_loggers(["mlflow"], str(run_dir), CONFIG)
    logger.log_params(CONFIG)
    for row in [START, *ROWS]:
        logger.log_row(row)
    logger.log_row({"kind": "eval", "step": 20, "eval_top@5": 1.0})  # '@' is not allowed in MLflow names
    weights = run_dir / "final" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    logger.log_artifact(str(weights))
    logger.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "digits-run" and run.info.status == "FINISHED"
    assert run.data.params == {
        "lr": "0.001",
        "batch_size": "32",
        "betas": "[0.9, 0.999]",
        "hf_token": MASK,
        "data_url": "https://ann:***@data.example.com/digits",
        "metric_for_best": "null",
    }
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 0.75), (20, 0.5), (30, 0.25)]
    run_id = run.info.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy")] == [(20, 0.875)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/top_5")] == [(20, 1.0)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "final")] == ["final/model.safetensors"]
    assert run.data.tags["steadyfit.start.parameters"] == "163"
    assert run.data.tags["steadyfit.start.resumed_from"] == "null"
    assert not any(name.startswith("start/") for name in run.data.metrics)
    assert (run_dir / "mlflow-artifacts").is_dir() and find_secrets_in_files(run_dir, [SECRET]) == []


def test_mlflow_resumed_logger_continues_the_same_run(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    mlflow_env[1](tmp_path / "mlflow.db")
    first = build_loggers(["mlflow"], str(tmp_path), CONFIG)[0]
    first.log_params(CONFIG)
    first.log_row(ROWS[0])
    first.close()
    second = build_loggers(["mlflow"], str(tmp_path), CONFIG)[0]
    second.log_params({**CONFIG, "lr": 0.002})  # a changed value cannot overwrite an MLflow param
    second.log_row(ROWS[1])
    second.close()

    assert second.run_id == first.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first.run_id)
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "train/loss")) == [10, 20]
    assert run.data.params["lr"] == "0.001" and run.data.tags["steadyfit.changed_params"] == "lr"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_honours_the_tracking_uri_environment_variable(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    monkeypatch, copy_db = mlflow_env
    store = tmp_path / "shared.db"
    copy_db(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-experiment")

    logger = build_loggers(["mlflow"], str(tmp_path / "run"), CONFIG)[0]
    logger.log_row(ROWS[0])
    logger.close()

    assert not (tmp_path / "run" / "mlflow.db").exists()
    experiment = MlflowClient(tracking_uri=f"sqlite:///{store}").get_experiment_by_name("team-experiment")
    assert (
        experiment is not None
        and experiment.experiment_id == logger.client.get_run(logger.run_id).info.experiment_id
    )


def test_wandb_offline_run_is_written_under_the_run_dir_and_resumed_with_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")

    for attempt in range(2):
        (logger,) = build_loggers(["wandb"], str(tmp_path), CONFIG)
        logger.log_params(CONFIG)
        logger.log_row({**START, "step": 10 * attempt})
        logger.log_row(ROWS[attempt])
        logger.close()

    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and {run.name.rsplit("-", 1)[1] for run in runs} == {run_id}, "both attempts: one W&B run"
    records = b"".join(path.read_bytes() for run in runs for path in run.glob("*.wandb"))
    assert b"train/loss" in records and b"global_step" in records
    assert find_secrets_in_files(tmp_path, [SECRET]) == []


def test_wandb_records_the_command_line_masked(tmp_path, monkeypatch):
    # W&B keeps sys.argv in the run's metadata: an override naming a secret, or a URL with a password on
    # the command line, must reach its files masked.
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["steadyfit", "fit", "hub_token=hf_ArgvToken1234567", "run_dir=https://bob:ArgvPassw0rd@host/x"]
    monkeypatch.setattr(sys, "argv", argv)
    (logger,) = build_loggers(["wandb"], str(tmp_path), CONFIG)
    logger.close()
    assert sys.argv == argv, "the process's own argv is given back"
    # W&B's own process writes the run's metadata record, possibly after finish() returned: wait for it.
    deadline = time.monotonic() + 60
    while True:
        records = b"".join(path.read_bytes() for path in tmp_path.glob("wandb/offline-run-*/*.wandb"))
        if b"run_dir=" in records or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"run_dir=https://bob:***@host/x" in records, "the command line is recorded, masked"
    assert find_secrets_in_files(tmp_path, ["hf_ArgvToken1234567", "ArgvPassw0rd"]) == []


def test_mlflow_and_wandb_mask_a_run_directory_named_after_a_secret(tmp_path, mlflow_env, monkeypatch):
    from mlflow.tracking import MlflowClient

    token = "hf_RunDirNamedAfterToken42"
    monkeypatch.setenv("HF_TOKEN", token)
    run_dir = tmp_path / token
    mlflow_env[1](run_dir / "mlflow.db")
    (mlflow_logger,) = build_loggers(["mlflow"], str(run_dir), CONFIG)
    mlflow_logger.close()

    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(mlflow_logger.run_id)
    assert run.info.run_name == MASK
    assert run.data.tags["steadyfit.run_dir"] == str(tmp_path.resolve() / MASK)

    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (wandb_logger,) = build_loggers(["wandb"], str(run_dir), CONFIG)
    try:
        assert wandb_logger.run.name == MASK
    finally:
        wandb_logger.close()


def wandb_exit_codes(run_dir) -> list[int]:
    """The exit codes recorded in a W&B offline run's ``.wandb`` files, read with W&B's own record type.

    The file is a 7-byte W&B header, then LevelDB log blocks of 32 KiB: each chunk has a 7-byte header
    (crc, length, type: 1 whole record, 2 first, 3 middle, 4 last part).
    """
    from wandb.proto.wandb_internal_pb2 import Record

    codes = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        raw, position, record = path.read_bytes(), 7, b""
        while position + 7 <= len(raw):
            left = 32768 - position % 32768
            length, kind = int.from_bytes(raw[position + 4 : position + 6], "little"), raw[position + 6]
            if left < 7 or (length == 0 and kind == 0):
                position += left  # block padding
                continue
            record += raw[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):
                parsed = Record.FromString(record)
                if parsed.WhichOneof("record_type") == "exit":
                    codes.append(parsed.exit.exit_code)
                record = b""
    return codes


def test_wandb_records_a_failed_or_preempted_run_with_a_non_zero_exit_code(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")

    for outcome in ("failed", "preempted", "finished"):  # one W&B run, attempt after attempt
        (logger,) = build_loggers(["wandb"], str(tmp_path), CONFIG)
        logger.log_row(ROWS[0])
        logger.close(outcome=outcome)

    assert wandb_exit_codes(tmp_path) == [1, 1, 0]
