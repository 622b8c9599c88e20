"""The loss contract: a loss returns a scalar mean or a ``(sum, count)`` pair; here both become a sum and a
count, so a window of micro-batches (and, later, of ranks) is normalised by its total count."""

from __future__ import annotations

from typing import Any

import torch


class LossContractError(TypeError):
    """A loss or metric function returned something other than a scalar or a (sum, count) pair."""


def as_sum_and_count(value: Any, num_samples: int, name: str = "loss_fn") -> tuple[torch.Tensor, Any, bool]:
    """Split a loss value into ``(sum, count, is_pair)``.

    A scalar mean counts ``num_samples`` (the micro-batch's sample count); a ``(sum, count)`` pair keeps
    its own count (tokens, say). ``count`` stays a tensor when the loss returned one, so reading it never
    synchronises host and device.

    Example:
        >>> total, count, is_pair = as_sum_and_count(torch.tensor(2.0), 4)
        >>> float(total), count, is_pair
        (8.0, 4, False)
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise LossContractError(
                f"{name} returned a sequence of {len(value)} items; expected (sum, count)"
            )
        total, count = value
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            raise LossContractError(f"{name} returned (sum, count) whose sum is not a 0-dim tensor")
        return total, count, True
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise LossContractError(
                f"{name} returned a tensor of shape {tuple(value.shape)}; expected a scalar mean or a "
                "(sum, count) pair (did you forget reduction='mean'?)"
            )
        return value * num_samples, num_samples, False
    raise LossContractError(
        f"{name} returned {type(value).__name__}; expected a scalar tensor or (sum, count)"
    )


def model_loss(outputs: Any) -> torch.Tensor:
    """The ``loss`` a model computed itself (Hugging Face style), for dict batches without ``loss_fn``."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, dict):
        loss = outputs.get("loss")
    if loss is None:
        raise LossContractError(
            "no loss_fn was given and the model output has no `loss`; pass loss_fn=... to the Trainer"
        )
    return loss
