"""The logging window: train loss and throughput since the last train row, kept on the device between
logging steps, the run's totals and its clock (``time_s``)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from steadyfit.state import TrainState


class LogWindow:
    """Loss, samples and the last gradient norm of the optimizer steps since the last train row.

    Host reads happen only in :meth:`row` (logging steps) and :meth:`state_dict` (checkpoints). The loss of
    the run's first step, alone, rides on the first row's read as ``first_step_loss``: the loss of the
    untrained model, the baseline the diagnostics compare a run that goes wrong from the start with.

    Example:
        >>> window = LogWindow(torch.device("cpu"))
        >>> window.add(torch.tensor(6.0), 3, 3, torch.tensor(0.5), counts_tokens=False)
        >>> window.row(TrainState(step=1), lr=0.1)["loss"]
        2.0
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)  # counts on the device
        self.host_count = 0  # counts the host knows (samples): adding them costs no device op
        self.run_loss_sum = 0.0
        self.run_loss_count = 0.0
        self.samples = 0
        self.pending_steps = 0
        self.counts_tokens = False
        self.grad_norm: torch.Tensor | None = None
        # Until the row that carries it: the first step's mean loss, on the device.
        self.first_step_loss: torch.Tensor | None = None
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
        self, loss_sum: torch.Tensor, count: Any, samples: int, grad_norm: torch.Tensor, counts_tokens: bool
    ) -> None:
        """Add one applied optimizer step; ``counts_tokens``: the count is tokens (``(sum, count)`` loss)."""
        self.counts_tokens = counts_tokens
        if not self.saw_first_step:
            self.saw_first_step = True
            self.first_step_loss = loss_sum.detach().to(torch.float64) / count  # on the device: no read
        self.loss_sum += loss_sum
        if isinstance(count, torch.Tensor):
            self.loss_count += count
        else:
            self.host_count += count
        self.samples += samples
        self.pending_steps += 1
        self.grad_norm = grad_norm

    def exclude(self, seconds: float) -> None:
        """Keep time spent outside training (an evaluation) out of the window's throughput."""
        self.started += seconds

    def row(self, state: TrainState, lr: float) -> dict[str, Any]:
        """The train row of the window, which then starts afresh. One host read."""
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        grad_norm = self.grad_norm if self.grad_norm is not None else torch.full((), math.nan)
        numbers = [self.loss_sum, self.loss_count, grad_norm.to(device=self.device, dtype=torch.float64)]
        if self.first_step_loss is not None:
            numbers.append(self.first_step_loss.to(device=self.device, dtype=torch.float64))
        loss_sum, loss_count, grad_norm_value, *first_step = torch.stack(numbers).tolist()
        loss_count += self.host_count
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
            "grad_norm": grad_norm_value,
            "samples_per_sec": self.samples / elapsed,
            **({"tokens_per_sec": loss_count / elapsed} if self.counts_tokens else {}),
            "step_time_s": elapsed / max(self.pending_steps, 1),
            "samples_seen": state.samples_seen,
            "nonfinite_skips": state.nonfinite_skips,
            **({"first_step_loss": first_step[0]} if first_step else {}),
        }
        self.first_step_loss = None
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.host_count = 0
        self.samples = 0
        self.pending_steps = 0
        self.started = now
        return row

    def state_dict(self) -> dict[str, Any]:
        """The open window and the run totals, so a resumed run logs the same numbers. Reads the host."""
        return {
            "loss_sum": float(self.loss_sum),
            "loss_count": float(self.loss_count) + self.host_count,
            "run_loss_sum": self.run_loss_sum,
            "run_loss_count": self.run_loss_count,
            "samples": self.samples,
            "pending_steps": self.pending_steps,
            "counts_tokens": self.counts_tokens,
            "grad_norm": None if self.grad_norm is None else float(self.grad_norm),
            "first_step_loss": None if self.first_step_loss is None else float(self.first_step_loss),
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
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count.fill_(state["loss_count"])
        self.host_count = 0
        self.run_loss_sum = float(state["run_loss_sum"])
        self.run_loss_count = float(state["run_loss_count"])
        self.samples = int(state["samples"])
        self.pending_steps = int(state["pending_steps"])
        self.counts_tokens = bool(state.get("counts_tokens", False))
        grad_norm = state.get("grad_norm")
        self.grad_norm = None if grad_norm is None else torch.tensor(float(grad_norm), device=self.device)
        first_step_loss = state.get("first_step_loss")
        self.first_step_loss = (
            None
            if first_step_loss is None
            else torch.tensor(float(first_step_loss), dtype=torch.float64, device=self.device)
        )
        # A checkpoint from before these keys: a run that trained has seen its first step, whose loss is lost.
        self.saw_first_step = bool(
            state.get("saw_first_step", self.run_loss_count > 0 or self.pending_steps > 0)
        )
        self.started = time.perf_counter()

    def run_mean(self) -> float | None:
        """Mean train loss over the whole run (logged windows and the open one)."""
        total = self.run_loss_sum + float(self.loss_sum)
        count = self.run_loss_count + float(self.loss_count) + self.host_count
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
