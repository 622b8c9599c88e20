"""The start-up summary: the start row's numbers, its console line, and a resumed run's own start row."""

from __future__ import annotations

import torch

from helpers import base_config, make_mlp, make_regression, metric_rows
from steadyfit import Trainer

CE = torch.nn.functional.cross_entropy


def _start_lines(stderr: str) -> list[str]:
    """The start-up summary's two console lines (what is trained, then how), each fit for a piped log."""
    lines = [line for line in stderr.splitlines() if line.startswith("steadyfit: start: ")]
    assert len(lines) == 2 and all(len(line) <= 100 for line in lines), lines
    return lines


def test_the_start_row_counts_parameters_samples_steps_and_the_accumulated_batch(tmp_path, capsys):
    model = make_mlp()  # Linear(6, 16) + Linear(16, 3): 112 + 51 parameters
    model[0].requires_grad_(False)
    # 50 samples in micro-batches of 4: 13 per epoch, windows of 3: 5 steps per epoch (the last one short).
    config = base_config(tmp_path, batch_size=4, grad_accum_steps=3, max_epochs=2, progress=False)
    Trainer(model, config, train_data=make_regression(50), loss_fn=CE).fit()

    rows = metric_rows(tmp_path / "run")
    starts = [row for row in rows if row["kind"] == "start"]
    assert starts == [rows[0]], "one start row, the first of the file"
    assert {key: value for key, value in rows[0].items() if key != "time_s"} == {
        "kind": "start",
        "step": 0,
        "epoch": 0,
        "parameters": 163,
        "trainable_parameters": 51,
        "train_samples": 50,
        "steps_per_epoch": 5,
        "total_steps": 10,
        "batch_size": 4,
        "grad_accum_steps": 3,
        "world_size": 1,
        "effective_batch": 12,
        "device": "cpu",
        "precision": "fp32",
        "resumed_from": None,
    }
    what, how = _start_lines(capsys.readouterr().err)  # printed once, with progress=false too
    assert what.endswith("163 parameters (51 trainable) · 50 samples")
    assert how.endswith("10 steps (5 per epoch) · batch 12 (4 × 1 rank × 3 accumulated) · cpu fp32")


def test_data_without_a_length_has_no_sample_count(tmp_path, capsys):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(make_regression(64))

    config = base_config(tmp_path, batch_size=8, max_steps=3, max_epochs=None)
    Trainer(make_mlp(), config, train_data=Stream(), loss_fn=CE).fit()
    start = metric_rows(tmp_path / "run")[0]
    assert start["train_samples"] is None and start["steps_per_epoch"] is None and start["total_steps"] == 3
    what, how = _start_lines(capsys.readouterr().err)
    assert what.endswith("samples: unknown (no length)") and how.startswith(
        "steadyfit: start: 3 steps · batch 8"
    )


def test_a_resumed_run_writes_its_own_start_row_after_the_checkpoints_rows(tmp_path, capsys):
    data = make_regression(64)

    def run(max_steps: int) -> None:
        config = base_config(tmp_path, batch_size=8, max_epochs=None, max_steps=max_steps, save_every=4)
        Trainer(make_mlp(), config, train_data=data, loss_fn=CE).fit()

    run(4)
    capsys.readouterr()
    run(7)  # continues from the checkpoint at step 4
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    kinds_steps = [(row["kind"], row["step"]) for row in metric_rows(tmp_path / "run")]
    assert kinds_steps == [
        ("start", 0),
        ("train", 1),
        ("train", 2),
        ("train", 3),
        ("train", 4),
        # the first run's summary row went with the cut back to the checkpoint's rows
        ("start", 4),
        ("train", 5),
        ("train", 6),
        ("train", 7),
        ("summary", 7),
    ]
    resumed = metric_rows(tmp_path / "run")[5]
    assert resumed["resumed_from"] == str(checkpoint) and resumed["total_steps"] == 7
    what, _ = _start_lines(capsys.readouterr().err)
    assert what.endswith("resumed at step 4")


def test_rerunning_a_finished_run_replaces_only_its_start_row_and_saves_nothing_again(tmp_path):
    data = make_regression(64)
    config = base_config(tmp_path, batch_size=8, max_epochs=None, max_steps=4, save_every=2)

    def run() -> list[dict]:
        Trainer(make_mlp(), config, train_data=data, loss_fn=CE).fit()
        return metric_rows(tmp_path / "run")

    first = run()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004" / "manifest.json"
    saved = (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns)
    for _ in range(2):
        again = run()
        # The start row of the rerun takes the place before the summary: the file keeps its length.
        assert [row["kind"] for row in again] == [row["kind"] for row in first[:-1]] + ["start", "summary"]
        assert again[-2]["resumed_from"] == str(checkpoint.parent)
        assert again[:-2] == first[:-1], "every row of the finished run stays"
        written = (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns)
        assert written == saved, "the start row alone is no reason to save the step again"
