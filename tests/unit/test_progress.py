"""Console progress when it is not a terminal: one short line per row, the full row in metrics.jsonl."""

from __future__ import annotations

import io
import json

import torch.nn.functional as F

from helpers import base_config, make_mlp, make_regression
from steadyfit import Trainer
from steadyfit.loggers.progress import LINE_WIDTH, Progress

# A digits train row as metrics.jsonl holds it: every field, ~250 characters in the old console format.
TRAIN = {
    "kind": "train",
    "step": 120,
    "epoch": 2,
    "loss": 0.27331,
    "lr": 0.0019984,
    "grad_norm": 1.747,
    "samples_per_sec": 13450.3,
    "step_time_s": 0.002379,
    "samples_seen": 3836,
    "nonfinite_skips": 0,
    "memory_mb": 462.6,
    "peak_memory_mb": 462.6,
    "scheduled_lr": 0.0019984,
    "time_s": 3.72,
}


def lines(rows: list[dict], total_steps: int | None = 900) -> list[str]:
    stream = io.StringIO()  # not a terminal
    progress = Progress(True, total_steps, stream=stream)
    for row in rows:
        progress.log(row)
    return stream.getvalue().splitlines()


def test_a_train_row_is_one_short_line_of_the_numbers_that_matter():
    (line,) = lines([TRAIN])
    assert line == "[train     3.7s] step 120/900 epoch 2 loss 0.2733 lr 0.001998 samples/s 13450"


def test_an_eval_row_shows_its_metrics_and_leaves_out_what_does_not_fit():
    (line,) = lines([{"kind": "eval", "step": 135, "epoch": 3, "eval_loss": 0.1638, "eval_accuracy": 0.9526}])
    assert line == "[eval     0.0s] step 135/900 epoch 3 loss 0.1638 accuracy 0.9526"
    many = {"kind": "eval", "step": 135, "epoch": 3} | {f"eval_metric_{i}": i / 7 for i in range(20)}
    (line,) = lines([many])
    assert len(line) <= LINE_WIDTH and line.endswith(" ...") and "metric_0 0 metric_1 0.1429" in line


def test_every_piped_line_of_a_real_run_fits_in_the_width(tmp_path, capsys):
    config = base_config(tmp_path, progress=True, batch_size=8, max_epochs=2, eval_every=3)
    data = make_regression(48)
    Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=F.cross_entropy).fit()
    stderr = capsys.readouterr().err.splitlines()
    assert max(len(line) for line in stderr) <= LINE_WIDTH, "every line, the start-up summary's too"
    printed = [line for line in stderr if line.startswith("[")]
    kinds = {line[1:].split()[0] for line in printed}
    assert {"train", "eval", "summary"} <= kinds
    assert all(" step " in line and "/12 " in line for line in printed)  # step of the total, 12 steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = next(row for row in rows if row["kind"] == "train")
    assert {"grad_norm", "memory_mb", "peak_memory_mb"} <= train.keys()  # the file keeps the full row
