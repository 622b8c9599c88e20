"""Evaluation and prediction: eval mode and no_grad, restored after; exact sums and counts for metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from steadyfit import data as data_mod
from steadyfit.config import ConfigError, TrainConfig
from steadyfit.distributed import Distributed
from steadyfit.loss import LossContractError, as_sum_and_count, forward_batch
from steadyfit.metrics import MetricAccumulator
from steadyfit.precision import Precision


def check_eval_settings(config: TrainConfig, eval_data: Any) -> None:
    """A periodic evaluation asked for without eval data is an error, not a setting silently ignored.

    Example:
        >>> check_eval_settings(TrainConfig(eval_every=100), None)
        Traceback (most recent call last):
        ...
        steadyfit.config.ConfigError: eval_every: 100, but the Trainer has no eval_data; ...
    """
    if eval_data is None and config.eval_every:
        raise ConfigError(
            f"eval_every: {config.eval_every}, but the Trainer has no eval_data; pass eval_data=... or set "
            "eval_every=0"
        )


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
            batches = data_mod.loading_errors_named(data_mod.eval_batches(data, spec), "eval_data")
            for index, batch in enumerate(batches):
                batch = data_mod.move_to(batch, device, non_blocking)
                num_samples = dist.samples_in(data, batch, index, spec.eval_batch_size)
                try:
                    with precision.autocast():
                        outputs, value, targets = forward_batch(model, batch, loss_fn)
                    if num_samples == 0:
                        continue  # a stand-in that only kept this rank in step with the others
                    total, count, _ = as_sum_and_count(value, num_samples)
                    accumulator.add_loss(total, count)
                    accumulator.add_batch(outputs, targets, num_samples)
                except (torch.OutOfMemoryError, LossContractError, ConfigError):
                    raise
                except Exception as exc:
                    raise data_mod.BatchError(
                        f"eval_data: batch {index}: the forward, loss or a metric raised "
                        f"{data_mod.one_line(exc)}; the batch holds {data_mod.describe_batch(batch)}"
                    ) from exc
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
