"""Learning-rate schedules as pure factor functions of the optimizer step, and the torch scheduler over them.

A factor multiplies the base learning rate: the optimizer step ``k`` (0-based) runs at
``lr * factor(k)``, because the loop steps the scheduler once after every optimizer step. Every factor lies
in ``[0, 1]``; decaying schedules reach ``min_lr_ratio`` exactly at ``k == total_steps`` (the value held
after the last step) and stay there. docs/optimizers.md has the formulas in a table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.horizons import ONECYCLE_DEFAULT_WARMUP_RATIO, schedule_phases, steps_from_ratio

__all__ = [
    "ONECYCLE_DEFAULT_WARMUP_RATIO",
    "Factor",
    "build_factor",
    "build_scheduler",
    "constant_factor",
    "cosine_factor",
    "linear_factor",
    "onecycle_factor",
    "reapply_schedule",
    "resolve_scheduler",
    "step_factor",
    "steps_from_ratio",
    "warmup_factor",
    "wsd_factor",
]

Factor = Callable[[int], float]

_NEEDS_TOTAL_STEPS = ("linear", "cosine", "onecycle", "wsd")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``, then 1.

    The first step runs at ``lr / (warmup_steps + 1)`` rather than 0 (no step is wasted), and the peak is
    reached at ``step == warmup_steps``, the first step after warm-up.

    Example:
        >>> [warmup_factor(k, 3) for k in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return 1.0


def constant_factor(step: int, warmup_steps: int) -> float:
    """Warm-up, then the base learning rate.

    Example:
        >>> constant_factor(0, 0), constant_factor(1, 3)
        (1.0, 0.5)
    """
    return warmup_factor(step, warmup_steps)


def _progress(step: int, start: int, total_steps: int) -> float:
    """How far ``step`` is through ``[start, total_steps]``, clamped to ``[0, 1]``."""
    if step >= total_steps:
        return 1.0
    return max(0.0, (step - start) / (total_steps - start))


def linear_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warm-up, then a straight line from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps``.

    Example:
        >>> [linear_factor(k, 0, 4, 0.0) for k in (0, 2, 4, 9)]
        [1.0, 0.5, 0.0, 0.0]
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    # min + (1 - min) * remaining, not 1 - (1 - min) * progress: it lands on min_lr_ratio exactly.
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - _progress(step, warmup_steps, total_steps))


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warm-up, then half a cosine from 1 at ``warmup_steps`` to ``min_lr_ratio`` at ``total_steps``.

    Example:
        >>> [round(cosine_factor(k, 0, 4, 0.0), 6) for k in (0, 2, 4)]
        [1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_factor(step: int, warmup_steps: int, step_size: int, gamma: float, min_lr_ratio: float) -> float:
    """Warm-up, then multiply by ``gamma`` every ``step_size`` steps, never below ``min_lr_ratio``.

    Example:
        >>> [step_factor(k, 0, 2, 0.5, 0.0) for k in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    return max(min_lr_ratio, gamma ** ((step - warmup_steps) // step_size))


def onecycle_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """One cycle: half a cosine up from 0 to 1 over the warm-up, then half a cosine down to ``min_lr_ratio``.

    The rise uses the same position as :func:`warmup_factor`, ``(step + 1) / (warmup_steps + 1)``.

    Example:
        >>> [round(onecycle_factor(k, 1, 5, 0.0), 6) for k in (0, 1, 3, 5)]
        [0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        position = (step + 1) / (warmup_steps + 1)
        return 0.5 * (1.0 - math.cos(math.pi * position))
    return cosine_factor(step, warmup_steps, total_steps, min_lr_ratio)


def wsd_factor(
    step: int, warmup_steps: int, total_steps: int, decay_steps: int, min_lr_ratio: float
) -> float:
    """Warmup-stable-decay: warm-up, hold the peak, then decay over the last ``decay_steps`` steps.

    The decay follows ``1 - sqrt(progress)`` down to ``min_lr_ratio`` (the shape Hägele et al., 2024,
    found to match cosine). The decay starts at ``max(warmup_steps, total_steps - decay_steps)``.

    Example:
        >>> [wsd_factor(k, 0, 8, 4, 0.0) for k in (0, 4, 5, 8)]
        [1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay_start = max(warmup_steps, total_steps - decay_steps)
    progress = _progress(step, decay_start, total_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - math.sqrt(progress))


def build_factor(config: TrainConfig, total_steps: int | None) -> Factor:
    """The factor function of ``config.scheduler``.

    Args:
        config: supplies scheduler, warmup_steps, warmup_ratio, min_lr_ratio, decay_ratio, step_size and
            gamma.
        total_steps: optimizer steps in the whole run (:attr:`Horizons.total_steps
            <steadyfit.horizons.Horizons.total_steps>`), or None when it is not known in advance.

    Returns:
        A pure function ``factor(step) -> float``.

    Raises:
        ConfigError: (a ValueError) when the schedule needs ``total_steps`` and it is None, when the warm-up
            does not end before ``total_steps`` on a decaying schedule, or when ``gamma > 1`` for
            ``scheduler=step``.
        ValueError: when ``total_steps`` is below 1.

    Example:
        >>> factor = build_factor(TrainConfig(scheduler="cosine", warmup_steps=10), total_steps=110)
        >>> factor(0), factor(10), factor(110)
        (0.09090909090909091, 1.0, 0.0)
    """
    name = config.scheduler
    unknown_length = "set max_steps, or max_epochs with a dataset that has a length"
    if total_steps is None and name in _NEEDS_TOTAL_STEPS:
        raise ConfigError(f"scheduler={name} needs the total number of optimizer steps: {unknown_length}")
    if total_steps is None and config.warmup_ratio:
        raise ConfigError(
            f"warmup_ratio needs the total number of optimizer steps: {unknown_length} "
            "(or use warmup_steps instead)"
        )
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"total_steps: must be at least 1 (got {total_steps})")

    # The phases come from horizons.py, the one place every derived horizon of a run is computed.
    warmup, decay_steps = schedule_phases(config, total_steps)

    if name in _NEEDS_TOTAL_STEPS and warmup >= total_steps:
        raise ConfigError(
            f"warmup_steps: the warm-up ({warmup} steps) must end before the run does ({total_steps} "
            f"optimizer steps) for scheduler={name}; lower warmup_steps / warmup_ratio or train longer"
        )
    if name == "constant":
        return functools.partial(constant_factor, warmup_steps=warmup)
    if name == "step":
        if config.gamma > 1:
            raise ConfigError(f"gamma: must be at most 1 for scheduler=step (got {config.gamma})")
        return functools.partial(
            step_factor,
            warmup_steps=warmup,
            step_size=config.step_size,
            gamma=config.gamma,
            min_lr_ratio=config.min_lr_ratio,
        )
    if name == "wsd":
        return functools.partial(
            wsd_factor,
            warmup_steps=warmup,
            total_steps=total_steps,
            decay_steps=decay_steps,
            min_lr_ratio=config.min_lr_ratio,
        )
    decaying = {"linear": linear_factor, "cosine": cosine_factor, "onecycle": onecycle_factor}[name]
    return functools.partial(
        decaying, warmup_steps=warmup, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int | None
) -> LRScheduler:
    """A ``LambdaLR`` over :func:`build_factor`, to be stepped once per optimizer step.

    Its ``state_dict`` holds the step count and learning rates as plain numbers (JSON-safe); the factor
    itself is not saved but rebuilt from the config, so a restored scheduler continues exactly.

    Args:
        optimizer: the optimizer whose learning rates it drives; each group's current lr is its base.
        config: see :func:`build_factor`.
        total_steps: optimizer steps in the whole run, or None when unknown.

    Returns:
        The scheduler; right after construction each group's lr is ``base_lr * factor(0)``.

    Raises:
        ConfigError: as :func:`build_factor` (a ValueError).

    Example:
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> scheduler = build_scheduler(optimizer, TrainConfig(scheduler="linear"), total_steps=4)
        >>> scheduler.get_last_lr()
        [0.1]
    """
    return LambdaLR(optimizer, build_factor(config, total_steps))


def reapply_schedule(scheduler: LRScheduler) -> None:
    """Set the groups' learning rates to what this run's schedule gives at the scheduler's restored step.

    A restored optimizer holds the learning rates the saved run's schedule set. When the horizon changed
    on resume (a longer ``max_steps`` or ``max_epochs``), this run's factor gives another value at the
    same step, and the first step after the resume would run at the old schedule's rate. Applied to a
    ``LambdaLR`` only, with the same product its ``step`` computes (``base_lr * factor(step)``), so an
    unchanged schedule gets back exactly the rates it had; another scheduler keeps its own.

    Example:
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> scheduler = build_scheduler(optimizer, TrainConfig(scheduler="linear"), total_steps=4)
        >>> scheduler.last_epoch = 2  # restored: two steps taken
        >>> reapply_schedule(scheduler)
        >>> optimizer.param_groups[0]["lr"]
        0.05
    """
    if type(scheduler) is not LambdaLR:
        return
    step = scheduler.last_epoch
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a tensor lr stays one, as LambdaLR.step() keeps it
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports, as LambdaLR.step() would have set it


def resolve_scheduler(
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    total_steps: int | None,
    scheduler_or_factory: LRScheduler | Callable[[torch.optim.Optimizer], LRScheduler] | None = None,
) -> LRScheduler:
    """The scheduler of a run: the user's own if given, otherwise one built from the config.

    Args:
        optimizer: the run's optimizer.
        config: used only when ``scheduler_or_factory`` is None.
        total_steps: as in :func:`build_scheduler`.
        scheduler_or_factory: None, a torch scheduler over ``optimizer``, or a callable taking the optimizer
            and returning one. It is stepped once per optimizer step, without arguments.

    Returns:
        A torch learning-rate scheduler driving ``optimizer``.

    Raises:
        TypeError: when the argument or what the factory returns is not a torch scheduler, or is
            ``ReduceLROnPlateau`` (its ``step`` needs a metric).
        ValueError: when the scheduler drives another optimizer.

    Example:
        >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> factory = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        >>> type(resolve_scheduler(optimizer, TrainConfig(), None, factory)).__name__
        'StepLR'
    """
    if scheduler_or_factory is None:
        return build_scheduler(optimizer, config, total_steps)
    if isinstance(scheduler_or_factory, LRScheduler):
        scheduler = scheduler_or_factory
    elif callable(scheduler_or_factory):
        scheduler = scheduler_or_factory(optimizer)
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(
                f"scheduler factory returned {type(scheduler).__name__}, "
                "expected a torch.optim.lr_scheduler.LRScheduler"
            )
    else:
        raise TypeError(
            "scheduler: expected None, a torch.optim.lr_scheduler.LRScheduler or a callable returning one, "
            f"got {type(scheduler_or_factory).__name__}"
        )
    if isinstance(scheduler, ReduceLROnPlateau):
        raise TypeError(
            "scheduler: ReduceLROnPlateau needs a metric at every step and is not supported; "
            "use a schedule of the optimizer step"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError("scheduler: it drives a different optimizer from the one being trained")
    return scheduler
