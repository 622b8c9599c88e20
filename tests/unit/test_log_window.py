"""The logging window's own numbers: the first step's loss, the run clock (``time_s``), peak memory."""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, Trainer
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


def _train_rows(tmp_path, **overrides):
    losses = []

    def recording(outputs, targets):
        value = F.cross_entropy(outputs, targets)
        losses.append(value.item())
        return value

    # 40 samples in batches of 6: six steps of 6 samples and a last one of 4.
    config = base_config(tmp_path, batch_size=6, max_epochs=1, lr=0.01, **overrides)
    Trainer(make_mlp(), config, train_data=make_regression(40), loss_fn=recording).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return losses, [row for row in rows if row["kind"] == "train"]


def test_each_logged_loss_is_exactly_its_steps_own_mean(tmp_path):
    losses, rows = _train_rows(tmp_path, log_every=1)
    assert [row["loss"] for row in rows] == losses  # the short last step too
    assert rows[0]["first_step_loss"] == losses[0]


def test_a_window_logs_its_exact_sample_weighted_mean(tmp_path):
    losses, rows = _train_rows(tmp_path, log_every=3)
    samples = [6] * 6 + [4]
    weighted = [loss * n for loss, n in zip(losses, samples, strict=True)]
    # Summed in step order, as the window adds.
    expected = [sum(weighted[start : start + 3]) / sum(samples[start : start + 3]) for start in (0, 3, 6)]
    assert [row["loss"] for row in rows] == expected


def test_a_loss_that_is_a_view_does_not_keep_its_base_alive_until_the_row(tmp_path):
    # The window keeps its steps' loss tensors until the logging row reads them: a loss_fn that returns
    # one element of a large tensor must not keep the large tensor's memory alive that long.
    def first_of_many(outputs, targets):
        return F.cross_entropy(outputs, targets).expand(1 << 16).clone()[0]  # a view into 256 KiB

    held: list[int] = []

    class HeldAtStepEnd(Callback):
        def on_step_end(self, trainer, state):
            held.append(sum(loss.untyped_storage().nbytes() for loss, _, _ in trainer.log_window._unread))

    config = base_config(tmp_path, batch_size=6, max_epochs=1, lr=0.01, log_every=100)
    data = make_regression(40)
    Trainer(make_mlp(), config, train_data=data, loss_fn=first_of_many, callbacks=[HeldAtStepEnd()]).fit()
    assert held == [4 * step for step in range(1, 8)]  # one float32 per step waiting to be read


def test_a_window_reads_its_steps_when_rows_are_rare(monkeypatch):
    monkeypatch.setattr("steadyfit.log_window.UNREAD_STEPS", 2)
    values = [(1.5, 3), (0.25, 5), (2.0, 3), (0.75, 1), (3.0, 7)]
    window, unbounded = LogWindow(CPU), LogWindow(CPU)
    for mean, count in values:
        window.add(torch.tensor(mean), count, count, torch.tensor(1.0), weight=count, counts_tokens=False)
        assert len(window._unread) < 2
    monkeypatch.setattr("steadyfit.log_window.UNREAD_STEPS", 1024)
    for mean, count in values:
        unbounded.add(torch.tensor(mean), count, count, torch.tensor(1.0), weight=count, counts_tokens=False)
    rows = [w.row(TrainState(step=5), lr=0.1) for w in (window, unbounded)]
    assert rows[0]["loss"] == rows[1]["loss"] == sum(m * c for m, c in values) / sum(c for _, c in values)
    assert rows[0]["first_step_loss"] == rows[1]["first_step_loss"] == 1.5


def test_token_counts_beyond_float32_precision_stay_exact():
    window = LogWindow(CPU)
    tokens = 2**25 + 1  # float32 holds no odd integer above 2**24
    window.add(torch.tensor(3.0), torch.tensor(tokens), 8, torch.tensor(1.0), counts_tokens=True)
    state = TrainState(step=1)
    row = window.row(state, lr=0.1)
    assert state.tokens_seen == tokens
    assert row["loss"] == 3.0 / tokens


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
