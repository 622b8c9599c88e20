"""Hugging Face helpers: a token-level causal-LM loss with the ``(sum, count)`` contract, and a padding
collator for ragged token sequences that needs no tokenizer.

The Trainer itself needs nothing from here to train a ``transformers`` model: dict batches call
``model(**batch)`` and, without a ``loss_fn``, use ``outputs.loss``. That loss is a mean over the tokens of
one micro-batch, so under gradient accumulation (or several ranks) micro-batches with different token counts
are weighted by their sample counts instead. :func:`causal_lm_loss` returns the sum and the token count, so
the window is normalised by its total token count: accumulation is exact over tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional

IGNORE_INDEX = -100
"""Label value that takes no part in the loss (the convention of ``transformers`` and ``cross_entropy``)."""


def causal_lm_loss(outputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy as ``(sum over predicted tokens, number of predicted tokens)``.

    Position ``t`` predicts label ``t + 1`` (the shift a ``...ForCausalLM`` model applies to its own
    ``labels``); labels equal to ``-100`` (padding, prompt tokens) are left out of both the sum and the count.

    Args:
        outputs: a model output with ``.logits`` (or a ``"logits"`` key), or the logits tensor itself,
            shaped ``(batch, time, vocab)``.
        labels: ``(batch, time)`` token ids, ``-100`` where no loss is wanted.

    Returns:
        ``(sum, count)``: a 0-dim float32 tensor and a 0-dim integer tensor, both on the logits' device (the
        count stays a tensor, so reading it never synchronises host and device).

    Raises:
        ValueError: when ``outputs`` holds no logits or the shapes of logits and labels do not match.

    Example:
        >>> logits = torch.zeros(1, 3, 5)
        >>> total, count = causal_lm_loss(logits, torch.tensor([[1, 2, -100]]))
        >>> round(float(total / count), 4), int(count)
        (1.6094, 1)
    """
    logits = _logits_of(outputs)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_lm_loss: logits of shape {tuple(logits.shape)} do not match labels of shape "
            f"{tuple(labels.shape)}; expected (batch, time, vocab) and (batch, time)"
        )
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    # float32 for the sum: under bf16 autocast a sum over thousands of tokens would lose most of its digits.
    total = functional.cross_entropy(
        shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (shifted_labels != IGNORE_INDEX).sum()
    return total, count


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"causal_lm_loss: the model output ({type(outputs).__name__}) has no `logits` tensor; "
            "pass the logits or a model output that carries them"
        )
    return logits


class PadToLongest:
    """Collate ragged token sequences: pad each key to the longest sequence of the micro-batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100
    (so padding never counts in :func:`causal_lm_loss`). Padding goes on the right: with causal attention
    the real tokens' outputs do not depend on it. Non-sequence values (one number per sample) are stacked.
    Use it as ``Trainer(..., collate_fn=PadToLongest())`` for a ``datasets.Dataset`` whose rows have
    different lengths; equal-length rows need no collator (the default collate stacks them).

    Args:
        pad_token_id: the id written into padded ``input_ids`` positions (masked out anyway).

    Example:
        >>> rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
        >>> batch = PadToLongest()(rows)
        >>> batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()
        ([[5, 6, 7], [8, 0, 0]], [[5, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PadToLongest: got an empty list of samples")
        keys = list(features[0])
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            values = [torch.as_tensor(feature[key]) for feature in features]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            pad = self.pad_values.get(key, 0)
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
        if "attention_mask" not in batch and "input_ids" in batch:
            lengths = torch.tensor([len(feature["input_ids"]) for feature in features])
            positions = torch.arange(batch["input_ids"].shape[1])
            batch["attention_mask"] = (positions[None, :] < lengths[:, None]).long()
        return batch
