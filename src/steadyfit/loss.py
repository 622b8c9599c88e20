"""The loss contract: a loss returns a scalar mean or a ``(sum, count)`` pair; here both become a sum and a
count, so a window of micro-batches (and, later, of ranks) is normalised by its total count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from steadyfit.config import ConfigError


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


def forward_batch(
    model: Callable[..., Any], batch: Any, loss_fn: Callable[..., Any] | None
) -> tuple[Any, Any, Any]:
    """Run the model on one batch; returns ``(outputs, loss value, targets)``.

    A dict batch is passed as keyword arguments (``labels`` are the targets) and, without ``loss_fn``, the
    model's own ``outputs.loss`` is the loss; an ``(inputs, targets)`` pair gives
    ``loss_fn(model(inputs), targets)``.

    Raises:
        ValueError: a batch that is neither a pair nor a dict.
        ConfigError: a pair batch without ``loss_fn``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> batch = (torch.ones(3, 2), torch.zeros(3, 1))
        >>> outputs, loss, targets = forward_batch(model, batch, torch.nn.functional.mse_loss)
        >>> loss.dim(), targets.shape[0]
        (0, 3)
    """
    if isinstance(batch, dict):
        outputs = model(**batch)
        targets = batch.get("labels")
        if loss_fn is None:
            return outputs, model_loss(outputs), targets
        return outputs, loss_fn(outputs, targets if targets is not None else batch), targets
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            "train_data: each batch must be an (inputs, targets) pair or a dict of model arguments, "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    inputs, targets = batch
    if loss_fn is None:
        raise ConfigError("loss_fn: (inputs, targets) batches need a loss_fn, e.g. F.cross_entropy")
    outputs = model(inputs)
    return outputs, loss_fn(outputs, targets), targets
