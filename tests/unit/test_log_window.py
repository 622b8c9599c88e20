"""The logging window's own numbers: the first step's loss, the run clock (``time_s``), peak memory."""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from helpers import base_config, make_mlp, make_regression
from steadyfit import Trainer
from steadyfit.log_window import LogWindow, memory_mb
from steadyfit.loggers.base import Logger
from steadyfit.state import TrainState

CPU = torch.device("cpu")


def add(window: LogWindow, loss_sum: float, count: int) -> None:
    window.add(torch.tensor(loss_sum), count, count, torch.tensor(1.0), counts_tokens=False)


def test_the_first_row_alone_carries_the_first_steps_loss():
    window = LogWindow(CPU)
    add(window, 12.0, 4)  # step 1: mean 3.0
    add(window, 4.0, 4)  # step 2: mean 1.0
    first = window.row(TrainState(step=2), lr=0.1)
    assert (first["loss"], first["first_step_loss"]) == (2.0, 3.0)  # the window's mean, the first step's
    add(window, 2.0, 4)
    assert "first_step_loss" not in window.row(TrainState(step=3), lr=0.1)


def test_the_first_steps_loss_survives_a_checkpoint_before_the_first_row():
    window = LogWindow(CPU)
    add(window, 12.0, 4)
    saved = json.loads(json.dumps(window.state_dict()))
    resumed = LogWindow(CPU)
    resumed.load_state_dict(saved)
    add(resumed, 4.0, 4)  # not the first step: the restored one is
    assert resumed.row(TrainState(step=2), lr=0.1)["first_step_loss"] == 3.0


def test_a_window_from_a_checkpoint_without_the_new_keys_does_not_invent_a_first_step():
    trained = LogWindow(CPU)
    add(trained, 12.0, 4)
    trained.row(TrainState(step=1), lr=0.1)
    older = trained.state_dict()
    del older["first_step_loss"], older["saw_first_step"]  # what checkpoints of earlier versions hold
    resumed = LogWindow(CPU)
    resumed.load_state_dict(older)
    add(resumed, 40.0, 4)  # step 2 of that run, not its first step
    assert "first_step_loss" not in resumed.row(TrainState(step=2), lr=0.1)


def test_time_s_counts_from_start_not_from_construction():
    window = LogWindow(CPU)
    assert window.time_s() == 0.0  # rows before training: nothing has run yet
    time.sleep(0.2)  # the set-up: loggers starting, a resume
    window.start()
    add(window, 1.0, 1)
    row = window.row(TrainState(step=1), lr=0.1)
    assert window.time_s() < 0.2
    assert row["step_time_s"] < 0.2  # the first window's throughput leaves the set-up out too


def test_peak_memory_is_never_below_current_memory():
    kept = []
    for _ in range(5):
        kept.append(torch.ones(2**21))  # 8 MiB, touched: resident
        current, peak = memory_mb(CPU)
        assert peak >= current > 0


class SlowStart(Logger):
    """A logger whose start-up takes a second, as MLflow's or W&B's can on a busy machine."""

    def log_params(self, params):
        time.sleep(1.0)


def test_time_s_and_throughput_leave_the_loggers_start_up_out(tmp_path, monkeypatch):
    monkeypatch.setattr("steadyfit.rundir.build_loggers", lambda *args: [SlowStart()])
    config = base_config(tmp_path, batch_size=8, max_steps=3)
    Trainer(make_mlp(), config, train_data=make_regression(24), loss_fn=F.cross_entropy).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in rows if row["kind"] == "train")
    assert first["step"] == 1 and first["time_s"] < 1.0 and first["step_time_s"] < 1.0
    assert all(row["peak_memory_mb"] >= row["memory_mb"] for row in rows if row["kind"] == "train")
