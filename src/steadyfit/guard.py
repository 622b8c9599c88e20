"""The non-finite guard: a NaN/inf loss or gradient norm never reaches the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from steadyfit.state import TrainState

# Steps taken between two read points at most, when nothing else (logging, evaluation, checkpoints,
# max_steps) asks for one sooner: the learning-rate table holds this many entries.
MAX_UNREAD_STEPS = 1024


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nonfinite=raise`` or too many skips)."""


class NonFiniteGuard:
    """Decides, on the host, whether an optimizer step may go ahead, and books skips.

    :meth:`is_finite` reads one check on the host (``bool`` of a device tensor): one synchronisation on
    CUDA. The Trainer uses it only where the check cannot stay on the device (see :class:`DeviceSkip`).

    Example:
        >>> guard = NonFiniteGuard("skip", max_consecutive=3)
        >>> guard.is_finite(guard.finite_check(torch.tensor(1.0), torch.tensor(float("inf"))))
        False
    """

    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive

    @staticmethod
    def finite_check(loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """A device value that is 0 exactly when the loss and the gradient norm are both finite, NaN
        otherwise.

        A sum is finite only if both terms are (inf - inf is NaN, caught too), and a number is finite
        exactly when ``x - x`` is 0 (for inf and NaN it is NaN): two ops on every step, where
        ``torch.isfinite`` alone dispatches four. Left as a number, not a bool: the device-side skip
        compares it once into each dtype it needs.
        """
        checked = loss if grad_norm is None else loss + grad_norm
        if checked.requires_grad:
            checked = checked.detach()
        return checked - checked

    @staticmethod
    def is_finite(check: torch.Tensor) -> bool:
        """Read a :meth:`finite_check` on the host: one synchronisation on CUDA."""
        return bool(check == 0)

    def record_skip(
        self,
        state: TrainState,
        last_checkpoint: str | None,
        what: str,
        *,
        position: tuple[int, int] | None = None,
    ) -> None:
        """Count a skipped step, or stop with a message that says where and what to do.

        ``position``: (epoch, batch in the epoch) of the skipped step when it is booked after the fact.
        """
        epoch, batch = position or (state.epoch, state.batch_in_epoch)
        where = f"step {state.step + 1}, epoch {epoch}, batch {batch} of the epoch"
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


@dataclass(frozen=True)
class ReadCadence:
    """When the host must know the step count: the logging, evaluation and checkpoint intervals, and
    ``max_steps``; at the latest every ``MAX_UNREAD_STEPS`` steps.

    Example:
        >>> ReadCadence((10, None, 25), max_steps=None).steps_to_next_read(20)
        5
    """

    intervals: tuple[int | None, ...]
    max_steps: int | None

    def steps_to_next_read(self, step: int) -> int:
        """Optimizer steps from ``step`` to the next read point. A function of the step count alone, so
        every rank reads at the same steps."""
        gaps = [every - step % every for every in (*self.intervals, MAX_UNREAD_STEPS) if every]
        if self.max_steps is not None:
            gaps.append(self.max_steps - step)
        return max(1, min(gaps))


@dataclass
class StepRecord:
    """One optimizer step as the loop books it: what it consumed and measured, and whether it was applied.

    ``applied`` is a bool when the host checked the step, or the :meth:`NonFiniteGuard.finite_check` of a
    step checked on the device (read at the next read point). ``loss * loss_weight`` is the step's loss
    summed over its samples (or tokens). ``scaler_skip``: fp16's own skip of an overflowing step whose loss
    was finite (counted apart, not a fault).
    """

    applied: bool | torch.Tensor
    loss: torch.Tensor
    loss_weight: int
    loss_count: Any
    samples: int
    grad_norm: torch.Tensor
    counts_tokens: bool
    epoch: int
    batch_in_epoch: int
    scaler_skip: bool = False


class DeviceSkip:
    """Skips non-finite optimizer steps on the device, so nothing is read between read points.

    torch's fused Adam/AdamW kernel receives the step's finite flag as ``found_inf`` (the hook torch's
    GradScaler uses): a non-finite step leaves the weights and the optimizer state untouched, and the host
    does not wait to find out. Each step's learning rate is taken, on the device, from a table of the
    schedule indexed by the number of steps applied since the last read, so a skipped step does not
    advance the schedule either. At the next read point (logging, evaluation, checkpoint, epoch end,
    max_steps, a callback's ``on_step_end``, a preemption) :meth:`read` reads all the flags at once and the
    Trainer books steps, skips and scheduler steps exactly as if it had checked each step on the host.

    Cost per step: four tiny device ops (``found_inf``, this step's count, the counter, the table lookup),
    each on tensors of one element and one dtype, instead of one synchronisation.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        >>> skip = DeviceSkip(optimizer, LambdaLR(optimizer, lambda step: 1.0), torch.device("cpu"))
        >>> skip.plan(horizon=4)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> check = NonFiniteGuard.finite_check(torch.tensor(float("nan")), None)
        >>> skip.arm(check); optimizer.step()
        >>> skip.read([check])
        [False]
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, device: torch.device) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.horizon = 1
        self._set_lrs: list[float | None] = []
        self._planned = False
        # torch's CUDA kernels read a tensor lr as float32; the CPU kernel reads it as a double, the same
        # value the host-side step passes (so on CPU both paths are bitwise equal, tested).
        self._lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self._applied = torch.zeros(1, dtype=torch.long, device=device)
        self._table = torch.zeros((1, 1), dtype=self._lr_dtype, device=device)
        self._lrs = torch.zeros((1, 1), dtype=self._lr_dtype, device=device)
        # Written in place at every step: found_inf (float32, 1.0 skips the step inside torch's kernel) and
        # the step's count (1 if applied), each compared straight into its own dtype.
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._applied_now = torch.zeros((), dtype=torch.long, device=device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)

    @classmethod
    def for_run(
        cls, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, policy: str, host_bound: bool
    ) -> DeviceSkip | None:
        """The run's device-side check, or None where steps are checked on the host (``host_bound``: the
        run reads the host every step anyway, e.g. for EMA or fp16's GradScaler)."""
        if host_bound or not cls.applies(optimizer, scheduler, policy=policy):
            return None
        device = next(p.device for group in optimizer.param_groups for p in group["params"])
        return cls(optimizer, scheduler, device)  # type: ignore[arg-type]

    @staticmethod
    def applies(optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None, *, policy: str) -> bool:
        """Whether steps can be checked on the device: ``on_nonfinite=skip``, torch's own Adam or AdamW on
        its fused kernel (which takes ``found_inf`` and handles a skipped first step) over CPU or CUDA
        parameters, and torch's ``LambdaLR`` (a schedule that is a function of the step). Subclasses keep
        the host-side check: their ``step`` or ``get_lr`` may do more than the table reproduces."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return (
            policy == "skip"
            and type(scheduler) is LambdaLR
            and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and all(group.get("fused") for group in optimizer.param_groups)
            and all(p.device.type in ("cpu", "cuda") for p in params)
        )

    def plan(self, horizon: int) -> None:
        """Learning rates for up to ``horizon`` steps from the scheduler's position, the same Python
        products ``LambdaLR`` computes. Called at the first step after a read, so a callback that changed
        the schedule or the base lrs at the read point is honoured; so is one that set a group's lr: it
        applies to the next step, and the schedule's own value to the steps after it, as on the host,
        where the scheduler's next step overwrites it."""
        scheduler = self.scheduler
        start = scheduler.last_epoch
        rows = [
            [base * factor(start + k) for k in range(horizon)]
            for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
        scheduled = scheduler.get_last_lr()
        # A group lr set since the read (release() left the scheduler's value), until a step applies.
        self._set_lrs = [
            float(group["lr"]) if group["lr"] != lr else None
            for group, lr in zip(self.optimizer.param_groups, scheduled, strict=True)
        ]
        for row, set_lr in zip(rows, self._set_lrs, strict=True):
            if set_lr is not None:
                row[0] = set_lr
        self._table = torch.tensor(rows, dtype=self._lr_dtype, device=self.device)
        self._lrs = torch.empty((len(rows), 1), dtype=self._lr_dtype, device=self.device)
        self._applied.zero_()
        self.horizon = horizon
        self._planned = True
        # The groups' lrs become views of one device buffer until the next read point.
        for group, lr in zip(self.optimizer.param_groups, self._lrs[:, 0], strict=True):
            group["lr"] = lr
        self.optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]

    @property
    def is_planned(self) -> bool:
        """Whether the groups hold this read interval's device lrs (:meth:`plan` since the last release)."""
        return self._planned

    def arm(self, check: torch.Tensor) -> None:
        """Prepare the next ``optimizer.step()``: this step's lr from the table, and ``found_inf`` from the
        step's :meth:`NonFiniteGuard.finite_check`, so the step applies only if it is finite. Four device
        ops, no host read."""
        torch.index_select(self._table, 1, self._applied, out=self._lrs)
        torch.ne(check, self._zero, out=self._found_inf)
        # The lr of this step is already in _lrs: counting it now moves only the next step's lookup.
        torch.eq(check, self._zero, out=self._applied_now)
        self._applied.add_(self._applied_now)

    def read(self, checks: list[torch.Tensor]) -> list[bool]:
        """Whether each step of ``checks`` was applied: one host read. The optimizer is handed back as the
        host knows it (see :meth:`release`); the caller then books each step."""
        outcomes = [value == 0 for value in torch.stack(checks).tolist()]
        self.release(any(outcomes))
        return outcomes

    def release(self, applied: bool = True) -> None:
        """Give the groups their float lrs back (the scheduler's, as of the last read point) and drop
        ``found_inf``: what checkpoints, logs, callbacks and a reused optimizer must see. With no step
        ``applied`` since :meth:`plan`, a group lr set before it still holds, as on the host, where only
        the scheduler's step after an applied one overwrites it."""
        self._planned = False
        lrs = self.scheduler.get_last_lr()
        if not applied and self._set_lrs:
            lrs = [lr if set_lr is None else set_lr for lr, set_lr in zip(lrs, self._set_lrs, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf  # type: ignore[attr-defined]
