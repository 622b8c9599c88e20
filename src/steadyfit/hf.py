"""Hugging Face helpers: which units a ``transformers`` model's own loss averages over, the logits a metric
receives from a model output, a token-level causal-LM loss with the ``(sum, count)`` contract, and a padding
collator for ragged token sequences that needs no tokenizer.

The Trainer needs nothing from here to train a ``transformers`` model: dict batches call ``model(**batch)``
and, without a ``loss_fn``, the model's own ``outputs.loss`` is made exact over the window's tokens with
:func:`model_loss_kind` (see ``steadyfit.loss.ModelLoss``). :func:`causal_lm_loss` is the explicit
``(sum, count)`` form, for models whose own loss cannot be made exact.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.nn import functional

IGNORE_INDEX = -100
"""Label value that takes no part in the loss (the convention of ``transformers`` and ``cross_entropy``)."""

LossKind = Literal["next_token", "token", "sample", "unknown"]
"""What a model's own mean loss averages over: labels after a shift by one (causal LMs), labels (masked LM,
token classification), samples (sequence classification and the like), or something steadyfit cannot tell."""

# transformers' loss functions (transformers/loss/loss_utils.py), by name: no import of transformers needed.
_LOSS_FUNCTION_KINDS: dict[str, LossKind] = {
    "ForCausalLMLoss": "next_token",  # also the loss of "ForConditionalGeneration" models that call it
    "ForMaskedLMLoss": "token",
    "ForTokenClassification": "token",
    "ForSequenceClassificationLoss": "sample",
    "ForQuestionAnsweringLoss": "sample",
}
# A model's ``loss_type`` (from its class name) when its forward computes the loss itself. Not
# "ForConditionalGeneration": T5 and BART average over unshifted labels, LLaVA-like models over shifted ones.
_LOSS_TYPE_KINDS: dict[str, LossKind] = {
    "ForCausalLM": "next_token",
    "ForMaskedLM": "token",
    "ForTokenClassification": "token",
    "ForSequenceClassification": "sample",
    "ForImageClassification": "sample",
    "ForVideoClassification": "sample",
    "ForAudioClassification": "sample",
    "ForQuestionAnswering": "sample",
}


def model_loss_kind(model: torch.nn.Module) -> LossKind:
    """What the mean ``outputs.loss`` of ``model`` averages over, read from the (unwrapped) model once.

    A ``transformers`` model whose ``forward`` calls ``self.loss_function`` (GPT-2, Llama, BERT's LM head,
    ...) averages the way that function does: ``ForCausalLMLoss`` over ``labels`` shifted by one (or a
    ``shift_labels`` batch key), ``ForMaskedLMLoss`` and ``ForTokenClassification`` over ``labels != -100``,
    the classification losses over samples; a model with ``loss_type=None`` gets ``ForCausalLMLoss``, as
    transformers gives it. A model that computes its loss in its own code is known by its ``loss_type``
    (``ForMaskedLM``, ``ForTokenClassification``, ``ForCausalLM``, ``For*Classification``,
    ``ForQuestionAnswering``). Anything else (a plain ``nn.Module``, a custom ``loss_function``, T5's
    ``ForConditionalGeneration``) is ``"unknown"``.

    Args:
        model: the model before any DDP / FSDP / ``torch.compile`` wrapping.

    Returns:
        ``"next_token"``, ``"token"``, ``"sample"`` or ``"unknown"``.

    Example:
        >>> model_loss_kind(torch.nn.Linear(2, 2))
        'unknown'
    """
    model = getattr(model, "_orig_mod", model)  # a model the user compiled: its kind is its original's
    if _calls_loss_function(model):
        function = model.loss_function
        if getattr(function, "__module__", "") == "transformers.loss.loss_utils":
            return _LOSS_FUNCTION_KINDS.get(function.__name__, "unknown")
        return "unknown"  # a loss_function the user set: steadyfit cannot tell what it averages over
    return _LOSS_TYPE_KINDS.get(getattr(model, "loss_type", None) or "", "unknown")


def _calls_loss_function(model: torch.nn.Module) -> bool:
    """Whether ``model.forward``'s code calls ``self.loss_function`` (transformers' shared losses)."""
    if not isinstance(getattr(type(model), "loss_function", None), property):
        return False
    try:
        # Reads the model's source file: once, when the Trainer is built.
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


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


def predictions_of(outputs: Any) -> Any:
    """What a metric receives from a model's outputs: the ``logits`` of a Hugging Face ``ModelOutput`` (or of
    a dict with a ``"logits"`` key), otherwise the outputs unchanged.

    Example:
        >>> predictions_of({"loss": torch.tensor(0.3), "logits": torch.ones(2, 3)}).shape
        torch.Size([2, 3])
        >>> predictions_of(torch.zeros(4)).shape
        torch.Size([4])
    """
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    return logits if isinstance(logits, torch.Tensor) else outputs


def _logits_of(outputs: Any) -> torch.Tensor:
    logits = predictions_of(outputs)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"causal_lm_loss: the model output ({type(outputs).__name__}) has no `logits` tensor; "
            "pass the logits or a model output that carries them"
        )
    return logits


def pretrained_config_files(model: Any) -> dict[str, str] | None:
    """The JSON files ``from_pretrained`` reads beside a ``transformers`` model's weights, by file name:
    ``config.json`` (naming the model's class in ``architectures``, as ``save_pretrained`` does) and, for a
    model that generates, ``generation_config.json``. None for anything but a ``PreTrainedModel``.

    steadyfit writes the weights itself (every key, tied ones too, atomically) and these files beside them,
    instead of ``save_pretrained``, which overwrites the file in place and leaves tied weights out.

    Example:
        >>> pretrained_config_files(torch.nn.Linear(2, 2)) is None
        True
    """
    transformers = sys.modules.get("transformers")  # a PreTrainedModel means transformers is imported
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    files = {"config.json": config.to_json_string()}
    if model.can_generate() and model.generation_config is not None:
        files["generation_config.json"] = model.generation_config.to_json_string()
    return files


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
