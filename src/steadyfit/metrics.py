"""Exact evaluation metrics: per-sample (or per-token) sums and counts, divided once at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from steadyfit.hf import predictions_of
from steadyfit.loss import as_sum_and_count


def is_torchmetric(metric: Any) -> bool:
    """A torchmetrics ``Metric`` (duck-typed, so torchmetrics stays optional)."""
    return all(hasattr(metric, name) for name in ("update", "compute", "reset"))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Top-1 accuracy as ``(correct, count)``, the metric contract's exact form.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        (tensor(1.), 2)
    """
    correct = (outputs.argmax(dim=-1) == targets).sum().to(torch.float32)
    return correct, targets.numel()


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
            total, count, _ = as_sum_and_count(fn(outputs, targets), num_samples, name=f"metric {name!r}")
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
        results = {
            f"eval_{name}": (total / count if count else float("nan"))
            for name, total, count in zip(self.names, sums, counts, strict=True)
        }
        for name, metric in self.torchmetrics.items():
            value = metric.compute()
            results[f"eval_{name}"] = float(value) if isinstance(value, torch.Tensor) else value
        return results
