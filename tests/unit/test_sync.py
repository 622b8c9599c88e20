"""No hidden host reads in the hot loop: between logging steps, the only one is the guard's finite flag.

Every `.item()`, `.cpu()`, `.tolist()` and `bool()` on a tensor is counted during a run; on a GPU each
is a host-device synchronisation. The non-finite guard needs one per optimizer step (the decision to step
or skip is taken on the host, as torch's own GradScaler does); everything else waits for logging steps.
"""

from __future__ import annotations

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, Trainer

READS = ("item", "cpu", "tolist", "__bool__")


@pytest.fixture
def read_counter(monkeypatch):
    counts = {"reads": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


class ReadsPerStep(Callback):
    def __init__(self, counts):
        self.counts = counts
        self.by_step = {}
        self.last = 0

    def on_step_end(self, trainer, state):
        self.by_step[state.step] = self.counts["reads"] - self.last
        self.last = self.counts["reads"]


@pytest.mark.parametrize("loss", ["mean", "sum_count"])
def test_one_host_read_per_step_between_logging_steps(tmp_path, read_counter, loss):
    def sum_count(outputs, targets):
        return torch.nn.functional.cross_entropy(outputs, targets, reduction="sum"), targets.numel()

    loss_fn = torch.nn.functional.cross_entropy if loss == "mean" else sum_count
    recorder = ReadsPerStep(read_counter)
    # SGD: torch's foreach Adam reads its step counters with .item(), but those live on the CPU on every
    # device (no synchronisation); counting them here would hide what this test is about.
    config = base_config(
        tmp_path,
        batch_size=4,
        grad_accum_steps=2,
        log_every=5,
        max_epochs=1,
        max_grad_norm=1.0,
        scheduler="cosine",
        warmup_steps=2,
        optimizer="sgd",
        momentum=0.9,
        lr=0.01,
    )
    Trainer(make_mlp(), config, train_data=make_regression(80), loss_fn=loss_fn, callbacks=[recorder]).fit()
    quiet_steps = {step: reads for step, reads in recorder.by_step.items() if step % 5 != 0 and step > 1}
    assert quiet_steps, "the run must have steps between logging steps"
    assert set(quiet_steps.values()) == {1}, f"host reads per non-logging step: {quiet_steps}"
    assert all(reads > 1 for step, reads in recorder.by_step.items() if step % 5 == 0)
