"""Eval metrics are exact per-sample means under any split into batches."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steadyfit.metrics import MetricAccumulator, accuracy


@settings(max_examples=100, deadline=None)
@given(
    length=st.integers(1, 120),
    cuts=st.lists(st.integers(1, 30), min_size=1, max_size=40),
    seed=st.integers(0, 10_000),
)
def test_any_batch_split_gives_the_whole_set_means(length, cuts, seed):
    generator = torch.Generator().manual_seed(seed)
    outputs = torch.randn(length, 4, generator=generator)
    targets = torch.randint(0, 4, (length,), generator=generator)
    accumulator = MetricAccumulator({"accuracy": accuracy}, torch.device("cpu"))
    start, position = 0, 0
    while start < length:
        size = cuts[position % len(cuts)]
        out, tgt = outputs[start : start + size], targets[start : start + size]
        accumulator.add_loss(torch.nn.functional.cross_entropy(out, tgt) * len(tgt), len(tgt))
        accumulator.add_batch(out, tgt, len(tgt))
        start, position = start + size, position + 1
    result = accumulator.compute()
    expected_loss = torch.nn.functional.cross_entropy(outputs, targets).item()
    expected_accuracy = (outputs.argmax(1) == targets).double().mean().item()
    assert math.isclose(result["eval_loss"], expected_loss, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(result["eval_accuracy"], expected_accuracy, rel_tol=1e-12)
