"""The hand-written reference loop: the overhead floor, and what the parity tests prove the Trainer equals.

zero_grad -> forward -> loss -> backward -> clip -> step -> scheduler step; the loss is read on the host only
on logging steps. Nothing else: no accumulation, no guard, no checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class RawResult:
    steps: int
    logged_losses: list[float]


def tensor_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, order: torch.Tensor
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches by slicing a permutation: one indexing operation per batch."""
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield inputs[index], targets[index]


def raw_loop(
    model: torch.nn.Module,
    epochs_of_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_epochs: int = 1,
    max_steps: int | None = None,
    max_grad_norm: float | None = None,
    log_every: int = 0,
) -> RawResult:
    """Train ``model`` the plain way.

    Args:
        epochs_of_batches: ``epoch -> iterable of (inputs, targets)``; pass a DataLoader-backed function or
            :func:`tensor_batches` over a permutation.
    """
    model.train()
    step = 0
    logged: list[float] = []
    for epoch in range(max_epochs):
        for inputs, targets in epochs_of_batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if log_every and step % log_every == 0:
                logged.append(loss.item())  # the only host read: on logging steps
            if max_steps is not None and step >= max_steps:
                return RawResult(step, logged)
    return RawResult(step, logged)
