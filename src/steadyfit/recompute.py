"""Gradient checkpointing: recompute chosen blocks' activations in the backward pass instead of keeping
them, trading one more forward of those blocks for their activation memory."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.utils.checkpoint

from steadyfit.config import ConfigError


def enable_gradient_checkpointing(model: torch.nn.Module, setting: bool | list[str]) -> list[str]:
    """Apply ``TrainConfig.gradient_checkpointing`` to ``model``; returns what was switched on.

    ``True`` uses a Hugging Face model's own switch (``gradient_checkpointing_enable``, non-reentrant); a
    list of class names recomputes every submodule of those classes with :func:`torch.utils.checkpoint`.
    Parameter names do not change, so checkpoints and resume are unaffected, and the gradients are the
    same: the recomputed forward replays the RNG state (dropout) of the first.

    Raises:
        ConfigError: ``True`` for a model without its own switch, or a class name no submodule has.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> enable_gradient_checkpointing(model, ["Linear"])
        ['0 (Linear)', '2 (Linear)']
    """
    if setting is False or setting == []:
        return []
    if setting is True:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"gradient_checkpointing: true uses a Hugging Face model's own switch, and "
                f"{type(model).__name__} has none; name the blocks to recompute instead, e.g. "
                "gradient_checkpointing=[Block] (their class names)"
            )
        # transformers 5 renamed the switch; 4.x has only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return [type(model).__name__]
    names = set(setting)
    chosen = [(name, module) for name, module in model.named_modules() if type(module).__name__ in names]
    missing = names - {type(module).__name__ for _, module in chosen}
    if missing:
        present = sorted({type(module).__name__ for module in model.modules()})
        raise ConfigError(
            f"gradient_checkpointing: no submodule of class {', '.join(sorted(missing))}; the model has "
            f"{', '.join(present)}"
        )
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        # A Hugging Face decoder block recomputed in the backward pass would append to its key/value cache a
        # second time (transformers' own switch turns the cache off too); training never reads the cache.
        config.use_cache = False
    for _, module in chosen:
        # A bound method, so a deep copy of the model (EMA) recomputes its own block, not this one.
        module.forward = types.MethodType(_recomputed_forward, module)
    return [f"{name} ({type(module).__name__})" for name, module in chosen]


def _recomputed_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)  # evaluation keeps nothing for a backward anyway
    # Costs a second forward of this block during the backward pass.
    return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
