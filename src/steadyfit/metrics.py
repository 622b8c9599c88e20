"""Exact evaluation metrics: per-sample (or per-token) sums and counts, divided once at the end."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from steadyfit.config import ConfigError
from steadyfit.hf import IGNORE_INDEX, predictions_of
from steadyfit.loss import as_sum_and_count


def is_torchmetric(metric: Any) -> bool:
    """A torchmetrics ``Metric`` (duck-typed, so torchmetrics stays optional)."""
    return all(hasattr(metric, name) for name in ("update", "compute", "reset"))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 accuracy as ``(correct, count)``, the metric contract's exact form. Targets equal to -100
    (``IGNORE_INDEX``, as in the loss) count neither as right nor as wrong, so a token classifier's
    padded labels give the same score at every ``eval_batch_size``. The count stays a tensor: no host
    read.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, -100]))
        (tensor(1.), tensor(2))
    """
    counted = targets != IGNORE_INDEX
    correct = ((outputs.argmax(dim=-1) == targets) & counted).sum().to(torch.float32)
    return correct, counted.sum()


class MetricAccumulator:
    """Sums and counts for the eval loss and each metric over a whole evaluation.

    Everything stays on the device in float64 until :meth:`compute`, which reads the host once. Under
    several ranks, ``reduce`` sums the stacked totals across ranks in one collective.
    """

    def __init__(self, metrics: dict[str, Callable[..., Any]], device: torch.device) -> None:
        self.functions = {name: fn for name, fn in metrics.items() if not is_torchmetric(fn)}
        self.torchmetrics = {name: fn for name, fn in metrics.items() if is_torchmetric(fn)}
        self.device = device
        names = ["loss", *self.functions]
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        for metric in self.torchmetrics.values():
            metric.reset()

    def add_loss(self, total: torch.Tensor, count: Any) -> None:
        self.sums[0] += total.detach().to(torch.float64)
        self.counts[0] += count

    def add_batch(self, outputs: Any, targets: Any, num_samples: int) -> None:
        outputs = predictions_of(outputs)  # a ModelOutput's logits
        for position, (name, fn) in enumerate(self.functions.items(), start=1):
            try:
                value = _host_numbers_as_tensors(fn(outputs, targets))
            except (torch.OutOfMemoryError, ConfigError):
                raise
            except Exception as exc:  # the evaluation names the batch; this says which metric
                raise RuntimeError(f"metric {name!r} raised {type(exc).__name__}: {exc}") from exc
            total, count, _ = as_sum_and_count(value, num_samples, name=f"metric {name!r}")
            self.sums[position] += total.detach().to(torch.float64)
            self.counts[position] += count
        for metric in self.torchmetrics.values():
            if getattr(metric, "device", self.device) != self.device and hasattr(metric, "to"):
                metric.to(self.device)
            metric.update(outputs, targets)

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """``eval_<name>`` → exact mean. One host read (and at most one collective) per evaluation."""
        stacked = torch.stack([self.sums, self.counts])
        if reduce is not None:
            stacked = reduce(stacked)
        sums, counts = stacked.tolist()
        if not counts[0]:
            raise ConfigError(
                "eval_data: the evaluation read no sample (an IterableDataset that yielded nothing, or "
                "targets that are all ignored), so there is no mean to report; pass data with samples"
            )
        results = {
            f"eval_{name}": (total / count if count else float("nan"))
            for name, total, count in zip(self.names, sums, counts, strict=True)
        }
        for name, metric in self.torchmetrics.items():
            value = metric.compute()
            # A MetricCollection computes a dict: one score per member, eval_<name>_<member>.
            parts = value.items() if isinstance(value, Mapping) else [("", value)]
            for part, score in parts:
                key = f"{name}_{part}" if part else name
                results[f"eval_{key}"] = _one_number(key, score)
        return results


def _one_number(name: str, score: Any) -> float:
    """A torchmetrics score as the one float a metrics row holds."""
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        return float(score)
    if isinstance(score, numbers.Real) and not isinstance(score, bool):
        return float(score)
    shape = list(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
    raise ConfigError(
        f"metrics: {name!r} computes {shape}, not one number (a per-class score, say average=None); make it "
        "one (average='macro' or 'micro'), or compute per-class scores in a callback's on_evaluate"
    )


def _host_numbers_as_tensors(value: Any) -> Any:
    """A metric's Python (or numpy) number, a mean or the sum of a ``(sum, count)`` pair, as a float64
    tensor: a metric computed on the host (scikit-learn's, say) meets the same contract as a tensor one."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], numbers.Real):
        return _host_numbers_as_tensors(value[0]), value[1]
    return value
