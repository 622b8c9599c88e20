"""The on_log event: every row of metrics.jsonl, in file order, with the file's content, on rank 0."""

from __future__ import annotations

import json

import torch

from helpers import base_config, make_mlp, make_regression, metric_rows
from steadyfit import Callback, Trainer

CE = torch.nn.functional.cross_entropy


class RowRecorder(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.events: list[str] = []

    def on_fit_start(self, trainer, state):
        self.events.append("fit_start")

    def on_log(self, trainer, state, row):
        self.rows.append(row)
        self.events.append(f"log:{row['kind']}")

    def on_evaluate(self, trainer, state, metrics):
        self.events.append("evaluate")

    def on_fit_end(self, trainer, state):
        self.events.append("fit_end")


class ExtraSchedulerStep(Callback):
    """Steps the schedule a second time each step: the lr_schedule diagnostic fires (a diagnostic row)."""

    def on_step_end(self, trainer, state):
        trainer.scheduler.step()


def test_on_log_receives_exactly_the_rows_of_metrics_jsonl_in_order(tmp_path):
    recorder = RowRecorder()
    data = make_regression(64)
    config = base_config(tmp_path, batch_size=8, log_every=2, eval_every=4, scheduler="cosine")
    Trainer(
        make_mlp(),
        config,
        train_data=data,
        eval_data=data,
        loss_fn=CE,
        callbacks=[recorder, ExtraSchedulerStep()],
    ).fit()

    written = metric_rows(tmp_path / "run")
    # Equal after the JSON round trip the file went through: same rows, same order, same content.
    assert json.loads(json.dumps(recorder.rows)) == written
    kinds = [row["kind"] for row in written]
    assert kinds[0] == "start" and kinds[-1] == "summary"
    assert {"train", "eval", "diagnostic"} <= set(kinds), kinds
    # Each finding right after the row that showed it, as in the file.
    finding = kinds.index("diagnostic")
    assert kinds[finding - 1] == "train"
    # on_fit_start before the start row; each eval row (and its findings) before its on_evaluate; the
    # summary row before on_fit_end.
    assert recorder.events[:2] == ["fit_start", "log:start"]
    assert recorder.events[-2:] == ["log:summary", "fit_end"]
    rows_before = [event for event in recorder.events if event != "log:diagnostic"]
    evaluations = [i for i, event in enumerate(rows_before) if event == "evaluate"]
    assert evaluations and all(rows_before[i - 1] == "log:eval" for i in evaluations)


def test_on_log_gets_a_copy_so_a_callback_cannot_change_what_later_sinks_read(tmp_path):
    class Vandal(Callback):
        def on_log(self, trainer, state, row):
            row.clear()

    data = make_regression(32)
    trainer = Trainer(
        make_mlp(), base_config(tmp_path, batch_size=8), train_data=data, loss_fn=CE, callbacks=[Vandal()]
    )
    trainer.fit()
    rows = metric_rows(tmp_path / "run")
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2, 3, 4]
    assert trainer.diagnostics.first_step_loss is not None, "diagnostics read the row after the callback"
