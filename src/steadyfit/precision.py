"""Numeric precision: autocast around forward and loss, and fp16 loss scaling (scale, unscale, step)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The smallest loss scale whose overflows are the GradScaler's business (float16's smallest normal number,
# 2**-14): a gradient that still overflows float16 below it exceeds 65504 / 2**-14, about 1e9.
SMALLEST_LOSS_SCALE = float(torch.finfo(torch.float16).tiny)


class Precision:
    """Owns autocast and, for fp16, the GradScaler, in the order the loop needs them.

    Order per optimizer step: ``scale(loss).backward()`` for each micro-batch, ``unscale_(optimizer)``
    before clipping, then ``step(optimizer)`` and ``update()``.

    Example:
        >>> precision = Precision("fp32", torch.device("cpu"))
        >>> with precision.autocast():
        ...     pass
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = precision
        self.device = device
        self.dtype = _AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    @property
    def uses_scaler(self) -> bool:
        return self.scaler is not None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for bf16/fp16; for fp32 a no-op context (entered on every micro-batch, so it is free)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            # GradScaler.step reads its inf flag on the host: fp16 pays one sync per step, as in torch.
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the GradScaler (fp16); raises ValueError for an fp16 run whose state has none."""
        if self.scaler is None:
            return
        if not isinstance(state, dict) or not state.get("scaler"):
            raise ValueError("precision: the checkpoint holds no GradScaler state for this fp16 run")
        self.scaler.load_state_dict(state["scaler"])
