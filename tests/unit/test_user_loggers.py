"""User logger objects in ``loggers``: the protocol, beside the named loggers, recorded by name, refused
when a method is missing."""

from __future__ import annotations

import contextlib
import csv
import os
import signal

import pytest
import torch
import yaml

from helpers import base_config, make_mlp, make_regression, metric_rows
from steadyfit import Callback, ConfigError, Logger, LoggerProtocol, TrainConfig, Trainer
from steadyfit.loggers.csv import CSVLogger
from steadyfit.loggers.registry import build_loggers
from steadyfit.lr_finder import find_lr
from steadyfit.signals import Preempted

CE = torch.nn.functional.cross_entropy


class MyLogger:
    """Follows the protocol without subclassing Logger: duck typing is enough."""

    def __init__(self) -> None:
        self.params: list[dict] = []
        self.rows: list[dict] = []
        self.artifacts: list[str] = []
        self.closed = 0

    def log_params(self, params):
        self.params.append(params)

    def log_row(self, row):
        self.rows.append(dict(row))

    def log_artifact(self, path):
        self.artifacts.append(path)

    def close(self):
        self.closed += 1


class NoArtifacts:
    def log_params(self, params):
        pass

    def log_row(self, row):
        pass

    def close(self):
        pass


def test_a_logger_object_gets_params_once_every_row_the_final_weights_and_one_close(tmp_path):
    mine = MyLogger()
    data = make_regression(32)
    config = base_config(tmp_path, batch_size=8, log_every=2, loggers=[mine, "csv"])
    Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE).fit()

    run_dir = tmp_path / "run"
    assert len(mine.params) == 1 and mine.params[0]["lr"] == config.lr
    assert mine.params[0]["loggers"] == ["MyLogger", "csv"], "logger params stay plain data"
    assert mine.rows == metric_rows(run_dir), "every row of metrics.jsonl, in order"
    assert {row["kind"] for row in mine.rows} == {"start", "train", "eval", "summary"}
    assert mine.artifacts == [str(run_dir / "final" / "model.safetensors")]
    assert mine.closed == 1
    # The named logger beside it wrote its files; config.yaml names the object by its class.
    with (run_dir / "metrics_train.csv").open(newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["2", "4"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loggers"] == ["MyLogger", "csv"]


def test_a_logger_object_is_closed_once_when_fit_raises(tmp_path):
    class Boom(Callback):
        def on_step_end(self, trainer, state):
            raise RuntimeError("boom")

    mine = MyLogger()
    data = make_regression(16)
    trainer = Trainer(
        make_mlp(), base_config(tmp_path, loggers=[mine]), train_data=data, loss_fn=CE, callbacks=[Boom()]
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert mine.closed == 1 and mine.rows[0]["kind"] == "start"


def test_an_object_without_a_logger_method_is_refused_naming_the_field_and_the_method(tmp_path):
    with pytest.raises(ConfigError, match=r"loggers\.1: NoArtifacts is not a logger: it lacks log_artifact"):
        TrainConfig(loggers=["csv", NoArtifacts()])
    with pytest.raises(ConfigError, match=r"loggers\.0: .*lacks log_params, log_row, log_artifact, close"):
        TrainConfig(loggers=[object()])
    with pytest.raises(ConfigError, match=r"loggers\.0: got 'neptune'; allowed values: 'jsonl', 'csv'"):
        TrainConfig(loggers=["neptune"])


def test_the_protocol_covers_the_built_in_loggers_and_the_base_class(tmp_path):
    assert isinstance(CSVLogger(str(tmp_path), {}), LoggerProtocol)
    assert isinstance(Logger(), LoggerProtocol) and isinstance(MyLogger(), LoggerProtocol)
    assert not isinstance(NoArtifacts(), LoggerProtocol)


def test_build_loggers_keeps_objects_in_order_once_each(tmp_path):
    first, second = MyLogger(), MyLogger()
    built = build_loggers([first, "jsonl", "csv", first, second], str(tmp_path), {})
    assert built[0] is first and isinstance(built[1], CSVLogger) and built[2] is second
    assert len(built) == 3


def test_configs_holding_a_logger_object_copy_and_serialise_as_plain_data(tmp_path):
    mine = MyLogger()
    config = TrainConfig(loggers=[mine, "tensorboard"])
    assert config.to_yaml_dict()["loggers"] == ["MyLogger", "tensorboard"]
    assert config.model_copy(update={"batch_size": 4}).loggers[0] is mine
    assert config.model_dump()["loggers"][0] is mine  # Python dumps keep the object (lr-find's copy)
    config.loggers = ["csv", mine]  # validated on assignment too
    with pytest.raises(ConfigError, match="lacks log_artifact"):
        config.loggers = [NoArtifacts()]


def test_lr_find_sends_nothing_to_the_runs_logger_object():
    mine = MyLogger()
    config = TrainConfig(batch_size=8, loggers=[mine], device="cpu")
    result = find_lr(make_mlp(), make_regression(64), loss_fn=CE, config=config, num_steps=5)
    assert len(result.lrs) == 5
    assert mine.params == mine.rows == [] and mine.closed == 0


class HearsOutcome(Logger):
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def close(self, outcome="finished"):
        self.outcomes.append(outcome)


@pytest.mark.parametrize(
    ("cause", "outcome", "status"),
    [(None, "finished", "FINISHED"), ("error", "failed", "FAILED"), ("sigterm", "preempted", "KILLED")],
)
def test_loggers_hear_how_the_run_ended_and_mlflow_records_it(tmp_path, monkeypatch, cause, outcome, status):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)

    class EndAtStep2(Callback):
        def on_step_end(self, trainer, state):
            if state.step == 2 and cause == "error":
                raise RuntimeError("user code failed")
            if state.step == 2 and cause == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # the run checkpoints, then raises Preempted

    hears, bare = HearsOutcome(), MyLogger()  # MyLogger.close() takes no outcome: called as before
    config = base_config(tmp_path, batch_size=8, loggers=[hears, bare, "mlflow"])
    trainer = Trainer(
        make_mlp(), config, train_data=make_regression(32), loss_fn=CE, callbacks=[EndAtStep2()]
    )
    raised = {
        None: contextlib.nullcontext(),
        "error": pytest.raises(RuntimeError),
        "sigterm": pytest.raises(Preempted),
    }
    with raised[cause]:
        trainer.fit()

    assert hears.outcomes == [outcome] and bare.closed == 1
    run_dir = tmp_path / "run"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    assert client.get_run((run_dir / "mlflow_run_id").read_text().strip()).info.status == status
