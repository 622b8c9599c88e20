"""The non-finite guard: a NaN/inf loss or gradient norm never reaches the weights."""

from __future__ import annotations

import torch

from steadyfit.state import TrainState


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nonfinite=raise`` or too many skips)."""


class NonFiniteGuard:
    """Decides, once per optimizer step, whether the step may go ahead.

    The check reads one flag on the host per optimizer step (``bool`` of a device tensor): free on CPU,
    one synchronisation per step on CUDA, the same price torch's own GradScaler pays under fp16.

    Example:
        >>> guard = NonFiniteGuard("skip", max_consecutive=3)
        >>> guard.is_finite(torch.tensor(1.0), torch.tensor(float("inf")))
        False
    """

    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive

    @staticmethod
    def is_finite(loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        # One op and one read: a sum is finite only if both terms are (inf - inf is NaN, caught too).
        total = loss_sum.detach() if grad_norm is None else loss_sum.detach() + grad_norm
        return bool(torch.isfinite(total))

    def record_skip(self, state: TrainState, last_checkpoint: str | None, what: str) -> None:
        """Count a skipped step, or stop with a message that says where and what to do."""
        where = f"step {state.step + 1}, epoch {state.epoch}, batch {state.batch_in_epoch} of the epoch"
        resume_hint = (
            f"; last good checkpoint: {last_checkpoint}" if last_checkpoint else "; no checkpoint yet"
        )
        if self.policy == "raise":
            raise NonFiniteError(f"non-finite {what} at {where}{resume_hint}")
        state.nonfinite_skips += 1
        state.consecutive_skips += 1
        if state.consecutive_skips > self.max_consecutive:
            raise NonFiniteError(
                f"{state.consecutive_skips} consecutive optimizer steps had a non-finite {what} (limit "
                f"max_consecutive_skips={self.max_consecutive}), the last at {where}{resume_hint}; "
                "lower the learning rate or check the data"
            )

    @staticmethod
    def record_ok(state: TrainState) -> None:
        state.consecutive_skips = 0
