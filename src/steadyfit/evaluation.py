"""Evaluation and prediction: eval mode and no_grad, restored after; exact sums and counts for metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from steadyfit import data as data_mod
from steadyfit.distributed import Distributed
from steadyfit.loss import as_sum_and_count, forward_batch
from steadyfit.metrics import MetricAccumulator
from steadyfit.precision import Precision


def evaluate_model(
    model: torch.nn.Module,
    data: Any,
    loss_fn: Callable[..., Any] | None,
    metrics: dict[str, Any],
    spec: data_mod.LoaderSpec,
    precision: Precision,
    dist: Distributed,
) -> dict[str, float]:
    """``eval_loss`` and ``eval_<metric>`` as exact per-sample (per-token) means over all of ``data``.

    ``loss_fn`` follows the Trainer's contract (None: the model's own ``outputs.loss``). Under several
    ranks each rank evaluates its strided share and the sums and counts are reduced once.
    """
    device = precision.device
    non_blocking = device.type == "cuda"
    accumulator = MetricAccumulator(metrics, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(data_mod.eval_batches(data, spec)):
                batch = data_mod.move_to(batch, device, non_blocking)
                num_samples = dist.samples_in(data, batch, index, spec.eval_batch_size)
                with precision.autocast():
                    outputs, value, targets = forward_batch(model, batch, loss_fn)
                if num_samples == 0:
                    continue  # a stand-in that only kept this rank in step with the others
                total, count, _ = as_sum_and_count(value, num_samples)
                accumulator.add_loss(total, count)
                accumulator.add_batch(outputs, targets, num_samples)
    finally:
        model.train(was_training)
    # One host read and, under several ranks, one collective for the whole evaluation.
    return accumulator.compute(reduce=dist.all_reduce_sum if dist.is_distributed else None)


def predict(model: torch.nn.Module, data: Any, spec: data_mod.LoaderSpec, precision: Precision) -> Any:
    """The model's outputs over all of ``data`` in order; tensors are concatenated along the batch."""
    device = precision.device
    whole = dataclasses.replace(spec, rank=0, world_size=1)
    outputs: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in data_mod.eval_batches(data, whole):
                batch = data_mod.move_to(batch, device, device.type == "cuda")
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                with precision.autocast():
                    outputs.append(model(**inputs) if isinstance(inputs, dict) else model(inputs))
    finally:
        model.train(was_training)
    if outputs and all(isinstance(out, torch.Tensor) for out in outputs):
        return torch.cat(outputs)
    return outputs
