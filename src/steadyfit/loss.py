"""The loss contract: a loss returns a scalar mean or a ``(sum, count)`` pair; here both become a sum and a
count, so a window of micro-batches (and, later, of ranks) is normalised by its total count. A model's own
``outputs.loss`` (``loss_fn=None``) joins the contract through :class:`ModelLoss`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from steadyfit.config import ConfigError
from steadyfit.hf import IGNORE_INDEX, LossKind, model_loss_kind


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
    loss, weight, count, is_pair = as_weighted_loss(value, num_samples, name)
    return (loss if is_pair else loss * weight), count, is_pair


def as_weighted_loss(
    value: Any, num_samples: int, name: str = "loss_fn"
) -> tuple[torch.Tensor, int, Any, bool]:
    """Split a loss value into ``(loss, weight, count, is_pair)``, where ``loss * weight`` is its sum.

    A scalar mean is ``(mean, num_samples, num_samples, False)``, a ``(sum, count)`` pair ``(sum, 1,
    count, True)``: the sum of a mean is left to whoever needs it, which saves the training step a device
    op (the log window multiplies on the host).

    Example:
        >>> as_weighted_loss(torch.tensor(2.0), 4)
        (tensor(2.), 4, 4, False)
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise LossContractError(
                f"{name} returned a sequence of {len(value)} items; expected (sum, count)"
            )
        total, count = value
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            raise LossContractError(f"{name} returned (sum, count) whose sum is not a 0-dim tensor")
        return total, 1, count, True
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise LossContractError(
                f"{name} returned a tensor of shape {tuple(value.shape)}; expected a scalar mean or a "
                "(sum, count) pair (did you forget reduction='mean'?)"
            )
        return value, num_samples, num_samples, False
    raise LossContractError(
        f"{name} returned {type(value).__name__}; expected a scalar tensor or (sum, count)"
    )


def model_loss(outputs: Any) -> torch.Tensor:
    """The ``loss`` a model computed itself (Hugging Face style), for dict batches without ``loss_fn``."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise LossContractError(
            "no loss_fn was given and the model output has no `loss`; pass loss_fn=... to the Trainer"
        )
    return loss


class ModelLoss:
    """The model's own mean ``outputs.loss`` as ``(mean * count, count)`` over the units it averaged.

    The Trainer builds one when ``loss_fn`` is None. For a model whose loss averages over tokens
    (:func:`~steadyfit.hf.model_loss_kind` says which), the count is the number of labels the loss used
    (``labels[..., 1:] != -100`` for a causal LM, ``labels != -100`` for a masked LM or token classifier), so
    the window, and the ranks, are normalised by their total token count: guarantee 1 over tokens. A loss
    averaged over samples stays a mean, weighted by samples, which is exact for it. For a model of unknown
    kind given labels with several values per sample, steadyfit cannot know what its mean counted: the
    mean is weighted by samples and a one-time warning names the model and the fix.

    Args:
        kind: what the model's loss averages over.
        model_name: the model's class name, for the warning.
        warn: where the one-time warning goes (None: nowhere, e.g. on ranks other than 0).

    Example:
        >>> loss = ModelLoss("token", "BertForMaskedLM")
        >>> outputs = {"loss": torch.tensor(0.5)}
        >>> total, count = loss(outputs, {"labels": torch.tensor([[3, -100, 4], [-100, -100, 5]])})
        >>> float(total), int(count)
        (1.5, 3)
    """

    def __init__(self, kind: LossKind, model_name: str, warn: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self.model_name = model_name
        self.warn = warn

    @classmethod
    def of(cls, model: torch.nn.Module, warn: Callable[[str], None] | None = None) -> ModelLoss:
        """The model's kind, read once from the model before it is wrapped (DDP, FSDP, torch.compile).

        Example:
            >>> ModelLoss.of(torch.nn.Linear(2, 2)).kind
            'unknown'
        """
        return cls(model_loss_kind(model), type(getattr(model, "_orig_mod", model)).__name__, warn)

    def __call__(self, outputs: Any, batch: dict[str, Any]) -> Any:
        """``(sum, count)`` for a model whose loss averages over tokens; otherwise its mean."""
        try:
            loss = model_loss(outputs)
        except LossContractError as exc:
            if "labels" not in batch and "label" in batch:
                raise LossContractError(
                    f"{exc}; the batch has a 'label' key but no 'labels', the name a transformers model "
                    "computes its loss from: rename it (dataset.rename_column('label', 'labels'); Hugging "
                    "Face's default collator renames it for you)"
                ) from None
            raise
        labels = batch.get("labels")
        if self.kind == "next_token":
            shifted = batch.get("shift_labels")
            # The count stays on the device: no host read (the window's division happens there too).
            count = (shifted if shifted is not None else labels[..., 1:]).ne(IGNORE_INDEX).sum()
        elif self.kind == "token":
            count = labels.ne(IGNORE_INDEX).sum()
        else:
            if self.kind == "unknown" and self.warn is not None and _has_token_labels(labels):
                self.warn(
                    f"{self.model_name} computes its own loss over several labels per sample, and steadyfit "
                    "cannot tell which of them it averaged over: its mean is weighted by samples, so "
                    "accumulation, several ranks and eval_loss are not exact over tokens. Pass a loss_fn "
                    "returning (sum, count), e.g. loss_fn=steadyfit.hf.causal_lm_loss for a causal LM"
                )
                self.warn = None  # once per Trainer
            return loss
        # mean * count is the sum the mean came from (float32 rounding; a mean has no more digits). With no
        # label to predict the model's mean is 0/0 = NaN: that micro-batch adds nothing, as a sum would.
        return torch.where(count > 0, loss.float() * count, 0.0), count


def _has_token_labels(labels: Any) -> bool:
    return isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels[0].numel() > 1


def forward_batch(model: Callable[..., Any], batch: Any, loss_fn: Callable[..., Any]) -> tuple[Any, Any, Any]:
    """Run the model on one batch; returns ``(outputs, loss value, targets)``.

    A dict batch is passed as keyword arguments (``labels`` are the targets) and, with a
    :class:`ModelLoss` (the Trainer's ``loss_fn=None``), the model's own ``outputs.loss`` is the loss, as
    ``(sum, count)`` where the model averaged over tokens. An ``(inputs, targets)`` pair gives
    ``loss_fn(model(inputs), targets)``.

    Raises:
        ValueError: a batch that is neither a pair nor a dict.
        ConfigError: a pair batch with the model's own loss (no ``loss_fn``).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> batch = (torch.ones(3, 2), torch.zeros(3, 1))
        >>> outputs, loss, targets = forward_batch(model, batch, torch.nn.functional.mse_loss)
        >>> loss.dim(), targets.shape[0]
        (0, 3)
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # first: the ABC check below costs more
        inputs, targets = batch
    elif isinstance(batch, Mapping):
        outputs = model(**batch)
        targets = batch.get("labels")
        if isinstance(loss_fn, ModelLoss):
            return outputs, loss_fn(outputs, batch), targets
        return outputs, loss_fn(outputs, targets if targets is not None else batch), targets
    else:
        raise ValueError(
            "train_data: each batch must be an (inputs, targets) pair or a dict of model arguments, "
            f"got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    if isinstance(loss_fn, ModelLoss):
        raise ConfigError("loss_fn: (inputs, targets) batches need a loss_fn, e.g. F.cross_entropy")
    outputs = model(inputs)
    return outputs, loss_fn(outputs, targets), targets
