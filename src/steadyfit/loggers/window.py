"""Loss and throughput over the logging window, kept on the device between logging steps."""

from __future__ import annotations

import time
from typing import Any

import torch

from steadyfit.state import TrainState


class WindowStats:
    """Loss and throughput over the current logging window, kept as device tensors between log steps.

    ``.item()``-style reads happen only in :meth:`row`, i.e. on logging steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.run_loss_sum = 0.0
        self.run_loss_count = 0.0
        self.samples = 0
        self.pending_steps = 0
        self.counts_tokens = False
        self.grad_norm: torch.Tensor | None = None
        self.started = time.perf_counter()

    def add(
        self, loss_sum: torch.Tensor, count: Any, samples: int, grad_norm: torch.Tensor, counts_tokens: bool
    ) -> None:
        """Add one optimizer step; ``counts_tokens``: the loss's count is tokens (a ``(sum, count)`` loss)."""
        self.counts_tokens = counts_tokens
        self.loss_sum += loss_sum
        self.loss_count += count
        self.samples += samples
        self.pending_steps += 1
        self.grad_norm = grad_norm

    def row(self, state: TrainState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        # One host read for the window's loss, count and last grad norm: this is the logging step.
        values = torch.stack([self.loss_sum, self.loss_count, self.grad_norm.to(torch.float64)]).tolist()
        loss_sum, loss_count, grad_norm = values
        self.run_loss_sum += loss_sum
        self.run_loss_count += loss_count
        if self.counts_tokens:
            state.tokens_seen += int(loss_count)
        row = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / loss_count if loss_count else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "samples_per_sec": self.samples / elapsed,
            **({"tokens_per_sec": loss_count / elapsed} if self.counts_tokens else {}),
            "step_time_s": elapsed / max(self.pending_steps, 1),
            "samples_seen": state.samples_seen,
            "nonfinite_skips": state.nonfinite_skips,
        }
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.samples = 0
        self.pending_steps = 0
        self.started = now
        return row

    def state_dict(self) -> dict[str, float]:
        """The open logging window and run totals, so a resumed run logs the same numbers.

        Reads the host: called at save time only.
        """
        return {
            "loss_sum": float(self.loss_sum),
            "loss_count": float(self.loss_count),
            "run_loss_sum": self.run_loss_sum,
            "run_loss_count": self.run_loss_count,
            "samples": self.samples,
            "pending_steps": self.pending_steps,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        if not state:
            return
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count.fill_(state["loss_count"])
        self.run_loss_sum = state["run_loss_sum"]
        self.run_loss_count = state["run_loss_count"]
        self.samples = int(state["samples"])
        self.pending_steps = int(state["pending_steps"])

    def run_mean(self, state: TrainState) -> float | None:
        total = self.run_loss_sum + float(self.loss_sum)
        count = self.run_loss_count + float(self.loss_count)
        return total / count if count else None


def memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak) memory in MiB: CUDA allocated memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
        current = resident_pages * resource.getpagesize() / 2**20
    except OSError:
        current = peak_kib / 1024
    return round(current, 1), round(peak_kib / 1024, 1)
