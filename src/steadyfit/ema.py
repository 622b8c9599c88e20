"""An exponential moving average of the weights, on torch's own AveragedModel."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from steadyfit.identity import without_compile_prefix


class WeightEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (the first copies).

    Buffers (e.g. BatchNorm statistics) are averaged too. The averaged copy is a separate weight set:
    evaluated as ``ema_eval_*``, saved in checkpoints and as ``final/ema.safetensors``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = WeightEMA(model, decay=0.9)
        >>> ema.update(model)
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        # Costs one extra copy of the weights in device memory.
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict_of_module(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names (for final/ema.safetensors)."""
        return self.averaged.module.state_dict()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # Checkpoints of a compiled model's wrapper named the averaged weights module._orig_mod.*.
        self.averaged.load_state_dict(without_compile_prefix(state, self.averaged.state_dict()))
