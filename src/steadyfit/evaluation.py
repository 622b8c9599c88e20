"""Evaluation and prediction: eval mode and no_grad, restored after; exact sums and counts for metrics."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from steadyfit import data as data_mod
from steadyfit.config import ConfigError, TrainConfig
from steadyfit.distributed import Distributed
from steadyfit.loss import LossContractError, as_sum_and_count, forward_batch
from steadyfit.metrics import MetricAccumulator, is_torchmetric
from steadyfit.precision import Precision
from steadyfit.rng import preserved_rng


def check_eval_settings(config: TrainConfig, eval_data: Any) -> None:
    """A periodic evaluation asked for without eval data is an error, not a setting silently ignored.

    Example:
        >>> check_eval_settings(TrainConfig(eval_every=100), None)
        Traceback (most recent call last):
        ...
        steadyfit.config.ConfigError: eval_every: 100, but the Trainer has no eval_data; ...
    """
    if eval_data is not None:
        return
    if config.eval_every:
        raise ConfigError(
            f"eval_every: {config.eval_every}, but the Trainer has no eval_data; pass eval_data=... or set "
            "eval_every=0"
        )
    for name in ("eval_on_start", "limit_eval_batches"):
        if getattr(config, name):
            raise ConfigError(
                f"{name}: {getattr(config, name)}, but the Trainer has no eval_data; pass eval_data=... or "
                f"leave {name} out"
            )


def check_metrics_meet_every_rank(metrics: Mapping[str, Any], data: Any, world_size: int, what: str) -> None:
    """A torchmetrics ``Metric`` that keeps its inputs in lists (AUROC, average precision, ...) syncs them
    itself in ``compute()``, and its collectives no longer pair up when a rank updated it with nothing,
    which happens when the data holds fewer samples than there are ranks: that is refused here, on every
    rank alike, rather than left to abort a process in the middle of a run.

    Raises:
        ConfigError: naming the data, the metrics and what to do.
    """
    length = data_mod.dataset_length(data)
    if world_size <= 1 or length is None or length >= world_size:
        return
    keeping_lists = [
        name for name, metric in metrics.items() if is_torchmetric(metric) and _keeps_lists(metric)
    ]
    if keeping_lists:
        raise ConfigError(
            f"{what}: {length} sample(s) over {world_size} ranks leave a rank with none, and the "
            f"torchmetrics metric(s) {', '.join(map(repr, keeping_lists))} cannot sync an empty rank's list "
            f"state; score at least {world_size} samples, or score this data in one process"
        )


def _keeps_lists(metric: Any) -> bool:
    # A torchmetrics state added with a list default is concatenated over ranks ("cat" reduction).
    return any(isinstance(default, list) for default in getattr(metric, "_defaults", {}).values())


def evaluate_model(
    model: torch.nn.Module,
    data: Any,
    loss_fn: Callable[..., Any],
    metrics: dict[str, Any],
    spec: data_mod.LoaderSpec,
    precision: Precision,
    dist: Distributed,
    max_batches: int | None = None,
    loader: data_mod.EvalBatches | None = None,
) -> dict[str, float]:
    """``eval_loss`` and ``eval_<metric>`` as exact per-sample (per-token) means over all of ``data`` (its
    first ``max_batches`` batches when set: ``limit_eval_batches``), read through ``loader`` when given (a
    fit's loader, whose workers may live from one evaluation to the next), else a loader of its own.

    ``loss_fn`` follows the Trainer's contract (a :class:`~steadyfit.loss.ModelLoss`: the model's own
    ``outputs.loss``, summed over tokens where the model averaged over tokens). Metrics receive the logits
    of a model output that has them. Under several ranks each rank evaluates its strided share and the sums
    and counts are reduced once. Every global random stream is left as it was found
    (:func:`~steadyfit.rng.preserved_rng`), so the training does not depend on how often it evaluates.
    """
    device = precision.device
    non_blocking = device.type == "cuda"
    accumulator = MetricAccumulator(metrics, device)
    was_training = model.training
    model.eval()
    try:
        # What the evaluation draws (a loader's base seed, an augmenting eval set) is not the training's.
        with torch.no_grad(), preserved_rng():
            if loader is not None:
                read = loader.of(data, max_batches)
            else:
                read = data_mod.eval_batches(data, spec, max_batches)
            batches = data_mod.loading_errors_named(read, "eval_data", data)
            # Batch i of every rank is its share of global batch i: a limit keeps the same samples on each
            # (a DataLoader or an IterableDataset is cut here; a map-style dataset's loader ends there).
            batches = itertools.islice(batches, max_batches)
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
    """The model's outputs over all of ``data`` in order, as one output: see :func:`concatenate_outputs`."""
    device = precision.device
    whole = dataclasses.replace(spec, rank=0, world_size=1)
    outputs: list[Any] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), preserved_rng():
            batches = data_mod.loading_errors_named(data_mod.eval_batches(data, whole), "predict", data)
            for index, batch in enumerate(batches):
                batch = data_mod.move_to(batch, device, device.type == "cuda")
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                try:
                    with precision.autocast():
                        outputs.append(model(**inputs) if isinstance(inputs, Mapping) else model(inputs))
                except torch.OutOfMemoryError:
                    raise
                except Exception as exc:
                    raise data_mod.BatchError(
                        f"predict: batch {index}: the forward raised {data_mod.one_line(exc)}; the batch "
                        f"holds {data_mod.describe_batch(batch)}"
                    ) from exc
    finally:
        model.train(was_training)
    return concatenate_outputs(outputs)


def concatenate_outputs(batches: list[Any]) -> Any:
    """One output for all ``batches``: every per-sample tensor concatenated along the batch dimension.

    A tensor output gives one tensor; a ``ModelOutput`` (or a dict) gives one of the same class whose
    tensor fields have a row per sample, tuple fields (``hidden_states``, ``attentions``) concatenated
    element by element. Values that are not per sample are left out: 0-dim tensors (a batch's mean
    ``loss``) and what is not a tensor (a generation cache); in a tuple their place holds None. Outputs of
    any other kind come back as the list of per-batch outputs.

    Raises:
        ValueError: a per-sample tensor whose shape beyond the batch dimension differs between batches
            (ragged padding, e.g. ``PadToLongest``): pad every batch to one length to predict at once.

    Example:
        >>> out = concatenate_outputs([{"loss": torch.tensor(0.5), "logits": torch.ones(2, 3)}] * 2)
        >>> sorted(out), out["logits"].shape
        (['logits'], torch.Size([4, 3]))
    """
    joined = _joined(batches, "outputs")
    return batches if joined is _LEFT_OUT else joined


_LEFT_OUT = object()  # a value with no row per sample: not part of the concatenated output


def _joined(values: list[Any], name: str) -> Any:
    first = values[0] if values else None
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        shapes = {tuple(value.shape[1:]) for value in values}
        if len(shapes) > 1:
            raise ValueError(
                f"predict: {name} has shapes {sorted(shapes)} beyond the batch dimension in different "
                "batches, so they cannot be concatenated; pad every batch to the same length (a "
                "collate_fn with a fixed length) or call the model on each batch yourself"
            )
        return torch.cat(values)
    if isinstance(first, Mapping):
        fields = {key: _joined([value[key] for value in values], f"{name}.{key}") for key in first}
        return type(first)(**{key: value for key, value in fields.items() if value is not _LEFT_OUT})
    if isinstance(first, tuple):
        elements = [_joined([value[i] for value in values], f"{name}[{i}]") for i in range(len(first))]
        if all(element is _LEFT_OUT for element in elements):
            return _LEFT_OUT
        return tuple(None if element is _LEFT_OUT else element for element in elements)
    return _LEFT_OUT
