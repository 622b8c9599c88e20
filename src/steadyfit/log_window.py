"""The logging window: train loss and throughput since the last train row, left on the device between
logging steps, the run's totals and its clock (``time_s``)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from steadyfit.state import TrainState

# Steps a window holds unread at most; then it reads them (when rows are rarer than this).
UNREAD_STEPS = 1024


class LogWindow:
    """Loss, samples and the last gradient norm of the optimizer steps since the last train row.

    Adding a step costs no device op: its loss tensor waits in the window, and the losses of all waiting
    steps come to the host together, in one read, at the next :meth:`row` (logging steps) or
    :meth:`state_dict` (checkpoints). There they are added in step order in double precision, so a resumed
    run that restores the window continues the same sums and logs the same numbers. The loss of the run's
    first step, alone, rides on that read as ``first_step_loss``: the loss of the untrained model, the
    baseline the diagnostics compare a run that goes wrong from the start with.

    Example:
        >>> window = LogWindow(torch.device("cpu"))
        >>> window.add(torch.tensor(2.0), 3, 3, torch.tensor(0.5), weight=3, counts_tokens=False)
        >>> window.row(TrainState(step=1), lr=0.1)["loss"]
        2.0
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # The window's steps already on the host; the rest wait in _unread as (loss, weight, count).
        self.loss_sum = 0.0
        self.loss_count = 0.0
        self._unread: list[tuple[torch.Tensor, float, Any]] = []
        self.run_loss_sum = 0.0
        self.run_loss_count = 0.0
        self.samples = 0
        self.pending_steps = 0
        self.counts_tokens = False
        self.grad_norm: torch.Tensor | None = None
        # The first step's mean loss, once read; until then the first step is _unread[0].
        self.first_step_loss: float | None = None
        self._first_step_unread = False
        self.saw_first_step = False
        self.started = time.perf_counter()
        self.training_started: float | None = None

    def start(self) -> None:
        """Training begins: ``time_s`` and the first window's throughput count from now, not from the set-up
        before it (loggers starting, a resume), which is no training time."""
        self.started = self.training_started = time.perf_counter()

    def time_s(self) -> float:
        """Seconds since :meth:`start` (0.0 before it): every row's ``time_s``."""
        if self.training_started is None:
            return 0.0
        return round(time.perf_counter() - self.training_started, 3)

    def add(
        self,
        loss: torch.Tensor,
        count: Any,
        samples: int,
        grad_norm: torch.Tensor,
        *,
        weight: float = 1,
        counts_tokens: bool,
    ) -> None:
        """Add one applied optimizer step whose loss summed over its samples (or tokens) is ``loss * weight``
        (a mean and its sample count, or a sum and 1); ``counts_tokens``: the count is tokens (``(sum,
        count)`` loss). Called where the host reads anyway (the Trainer books steps at read points): after
        ``UNREAD_STEPS`` waiting steps it reads them."""
        self.counts_tokens = counts_tokens
        if not self.saw_first_step:
            self.saw_first_step = self._first_step_unread = True
        self._unread.append((loss, weight, count))
        self.samples += samples
        self.pending_steps += 1
        self.grad_norm = grad_norm
        if len(self._unread) >= UNREAD_STEPS:
            self._read([])

    def exclude(self, seconds: float) -> None:
        """Keep time spent outside training (an evaluation) out of the window's throughput."""
        self.started += seconds

    def row(self, state: TrainState, lr: float) -> dict[str, Any]:
        """The train row of the window, which then starts afresh. One host read."""
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        grad_norm = self._read([self.grad_norm] if self.grad_norm is not None else [])
        loss_sum, loss_count = self.loss_sum, self.loss_count
        self.run_loss_sum += loss_sum
        self.run_loss_count += loss_count
        if self.counts_tokens:
            state.tokens_seen += int(loss_count)
        row = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / loss_count if loss_count else math.nan,
            "lr": lr,
            "grad_norm": grad_norm[0] if grad_norm else math.nan,
            "samples_per_sec": self.samples / elapsed,
            **({"tokens_per_sec": loss_count / elapsed} if self.counts_tokens else {}),
            "step_time_s": elapsed / max(self.pending_steps, 1),
            "samples_seen": state.samples_seen,
            "nonfinite_skips": state.nonfinite_skips,
            **({"first_step_loss": self.first_step_loss} if self.first_step_loss is not None else {}),
        }
        self.first_step_loss = None
        self.loss_sum = self.loss_count = 0.0
        self.samples = 0
        self.pending_steps = 0
        self.started = now
        return row

    def _read(self, extra: list[torch.Tensor]) -> list[float]:
        """Bring the waiting steps to the host and add them to the window in step order; ``extra`` tensors
        ride on the same read and come back as floats. One host read (none when nothing waits)."""
        unread, self._unread = self._unread, []
        device_counts = [count for _, _, count in unread if isinstance(count, torch.Tensor)]
        groups = [[loss for loss, _, _ in unread], device_counts, extra]
        # Each group is stacked apart: one stack of float32 losses and integer token counts would round
        # counts above 2**24.
        parts = [torch.stack([self._here(value) for value in group]).double() for group in groups if group]
        values = torch.cat(parts).tolist() if parts else []
        losses, counts = iter(values[: len(unread)]), iter(values[len(unread) : -len(extra) or None])
        for _, weight, count in unread:
            step_sum = next(losses) * weight
            step_count = next(counts) if isinstance(count, torch.Tensor) else count
            if self._first_step_unread:
                self._first_step_unread = False
                self.first_step_loss = step_sum / step_count if step_count else math.nan
            self.loss_sum += step_sum
            self.loss_count += step_count
        return values[len(values) - len(extra) :]

    def _here(self, value: torch.Tensor) -> torch.Tensor:
        return value if value.device == self.device else value.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """The open window and the run totals, so a resumed run logs the same numbers. Reads the host."""
        grad_norm = self._read([self.grad_norm] if self.grad_norm is not None else [])
        return {
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "run_loss_sum": self.run_loss_sum,
            "run_loss_count": self.run_loss_count,
            "samples": self.samples,
            "pending_steps": self.pending_steps,
            "counts_tokens": self.counts_tokens,
            "grad_norm": grad_norm[0] if grad_norm else None,
            "first_step_loss": self.first_step_loss,
            "saw_first_step": self.saw_first_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; every field is replaced.

        Raises:
            ValueError: a field is missing or not a number.
        """
        numbers = ("loss_sum", "loss_count", "run_loss_sum", "run_loss_count", "samples", "pending_steps")
        for key in numbers:
            if isinstance(state.get(key), bool) or not isinstance(state.get(key), (int, float)):
                raise ValueError(f"logging window: {key!r} must be a number, got {state.get(key)!r}")
        self.loss_sum = float(state["loss_sum"])
        self.loss_count = float(state["loss_count"])
        self._unread = []
        self.run_loss_sum = float(state["run_loss_sum"])
        self.run_loss_count = float(state["run_loss_count"])
        self.samples = int(state["samples"])
        self.pending_steps = int(state["pending_steps"])
        self.counts_tokens = bool(state.get("counts_tokens", False))
        grad_norm = state.get("grad_norm")
        self.grad_norm = None if grad_norm is None else torch.tensor(float(grad_norm), device=self.device)
        first_step_loss = state.get("first_step_loss")
        self.first_step_loss = None if first_step_loss is None else float(first_step_loss)
        self._first_step_unread = False
        # A checkpoint from before these keys: a run that trained has seen its first step, whose loss is lost.
        self.saw_first_step = bool(
            state.get("saw_first_step", self.run_loss_count > 0 or self.pending_steps > 0)
        )
        self.started = time.perf_counter()

    def run_mean(self) -> float | None:
        """Mean train loss over the whole run (logged windows and the open one). Reads the host."""
        self._read([])
        total = self.run_loss_sum + self.loss_sum
        count = self.run_loss_count + self.loss_count
        return total / count if count else None


def memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak) memory in MiB: CUDA allocated memory, or the process's resident set on CPU.

    The peak is never below the current value. On Linux both come from one read of /proc/self/status
    (VmRSS, VmHWM: the kernel computes the high-water mark with the current value included);
    ``getrusage``'s ``ru_maxrss`` is not used there, because it lags the resident set a little.
    """
    if device.type == "cuda":
        current, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        return round(current / 2**20, 1), round(peak / 2**20, 1)
    resident = _resident_kib()
    if resident is None:
        import resource

        # Without /proc (macOS): only the peak is known; ru_maxrss is bytes on macOS, KiB elsewhere.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib = maxrss / 1024 if sys.platform == "darwin" else float(maxrss)
        resident = peak_kib, peak_kib
    current_kib, peak_kib = resident
    # max: the row promises peak >= current, whichever source answered.
    return round(current_kib / 1024, 1), round(max(peak_kib, current_kib) / 1024, 1)


def _resident_kib() -> tuple[float, float] | None:
    """(VmRSS, VmHWM) in KiB from /proc/self/status, or None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS:", "VmHWM:")))
        return float(fields["VmRSS"].split()[0]), float(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None
