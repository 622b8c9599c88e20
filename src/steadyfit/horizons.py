"""Every derived horizon of a run, computed here and nowhere else: micro-batches and optimizer steps per
epoch, the total number of optimizer steps, and the phases of the learning-rate schedule.

They are functions of the dataset length and the global batch ``batch_size x world_size x
grad_accum_steps``, so N ranks with per-rank batch B/N plan exactly the run of one rank with batch B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.data import batches_per_epoch

# One-cycle without a configured warm-up rises over this fraction of the run (torch's OneCycleLR default).
ONECYCLE_DEFAULT_WARMUP_RATIO = 0.3


@dataclass(frozen=True)
class Horizons:
    """What a run plans before its first step.

    Attributes:
        world_size: ranks taking part.
        global_batch: samples per optimizer step, ``batch_size x world_size x grad_accum_steps``.
        batches_per_epoch: micro-batches of one epoch on each rank; None for data without a length.
        steps_per_epoch: optimizer steps of one epoch (the last window may be short); None without a length.
        total_steps: optimizer steps of the whole run, the smaller of ``max_steps`` and
            ``steps_per_epoch x max_epochs``.
        warmup_steps: the schedule's warm-up, from ``warmup_steps`` or ``warmup_ratio x total_steps``.
        decay_steps: wsd's final decay (``decay_ratio x total_steps``); None for other schedules.

    Example:
        >>> import torch
        >>> data = torch.utils.data.TensorDataset(torch.zeros(512, 1))
        >>> config = TrainConfig(batch_size=16, max_epochs=2, warmup_ratio=0.1)
        >>> horizons = compute_horizons(config, data, world_size=2)
        >>> horizons.steps_per_epoch, horizons.total_steps, horizons.warmup_steps
        (16, 32, 4)
    """

    world_size: int
    global_batch: int
    batches_per_epoch: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    warmup_steps: int
    decay_steps: int | None

    def ends_epoch(self, batch_in_epoch: int) -> bool:
        """Whether micro-batch position ``batch_in_epoch`` is the end of the epoch (known lengths only)."""
        return self.batches_per_epoch is not None and batch_in_epoch >= self.batches_per_epoch


def compute_horizons(config: TrainConfig, train_data: Any, world_size: int = 1) -> Horizons:
    """The horizons of a run of ``config`` over ``train_data`` on ``world_size`` ranks.

    A map-style dataset is split into global micro-batches of ``batch_size x world_size``; a user
    DataLoader counts its own batches on each rank (its sampler already splits the data over ranks).

    Raises:
        ConfigError: the data has no length and ``max_steps`` is not set, or the training set is empty.
    """
    batches = batches_per_epoch(train_data, config.batch_size, world_size)
    limit_field = "overfit_batches" if config.overfit_batches else "limit_train_batches"
    batches = limit_batches(train_batch_limit(config), batches, limit_field)
    if batches is None:
        if config.max_steps is None:
            raise ConfigError(
                "max_steps: train_data has no length (an IterableDataset?); set max_steps to say when to stop"
            )
        steps_per_epoch, total_steps = None, config.max_steps
    elif batches == 0:
        raise ConfigError("train_data: the training set is empty")
    else:
        steps_per_epoch = math.ceil(batches / config.grad_accum_steps)
        by_epochs = steps_per_epoch * config.max_epochs if config.max_epochs is not None else None
        total_steps = min(n for n in (by_epochs, config.max_steps) if n is not None)
    warmup_steps, decay_steps = schedule_phases(config, total_steps)
    return Horizons(
        world_size=world_size,
        global_batch=config.batch_size * world_size * config.grad_accum_steps,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
    )


def schedule_phases(config: TrainConfig, total_steps: int | None) -> tuple[int, int | None]:
    """``(warmup_steps, decay_steps)`` of ``config.scheduler`` over a run of ``total_steps``.

    The warm-up is ``warmup_steps``, or ``warmup_ratio x total_steps`` rounded up; one-cycle without either
    rises over 30% of the run (capped so that a very short run still reaches its end). ``decay_steps`` is
    wsd's final decay, ``decay_ratio x total_steps``. Without ``total_steps`` the ratios cannot apply: the
    schedule builder then says which field needs it.

    Example:
        >>> schedule_phases(TrainConfig(scheduler="wsd", warmup_ratio=0.1, decay_ratio=0.2), 100)
        (10, 20)
    """
    warmup = config.warmup_steps
    if total_steps is None:
        return warmup, None
    if config.warmup_ratio:
        warmup = steps_from_ratio(config.warmup_ratio, total_steps)
    elif config.scheduler == "onecycle" and not warmup:
        warmup = min(steps_from_ratio(ONECYCLE_DEFAULT_WARMUP_RATIO, total_steps), total_steps - 1)
    decay = steps_from_ratio(config.decay_ratio, total_steps) if config.scheduler == "wsd" else None
    return warmup, decay


def steps_from_ratio(ratio: float, total_steps: int) -> int:
    """``ceil(ratio * total_steps)``, computed on the ratio as written so 0.1 of 100 steps is 10, not 11.

    Example:
        >>> steps_from_ratio(0.1, 100), steps_from_ratio(0.01, 10)
        (10, 1)
    """
    return math.ceil(Fraction(repr(ratio)) * total_steps)


def train_batch_limit(config: TrainConfig) -> int | float | None:
    """The cap on an epoch's micro-batches: ``overfit_batches`` or ``limit_train_batches`` (None: none).

    Raises:
        ConfigError: both are set.
    """
    if config.overfit_batches and config.limit_train_batches is not None:
        raise ConfigError(
            "overfit_batches / limit_train_batches: set one of them (overfit_batches already limits the "
            "training batches)"
        )
    return config.overfit_batches or config.limit_train_batches


def limit_batches(
    limit: int | float | None, batches: int | None, field: str, what: str = "batches", hint: str = ""
) -> int | None:
    """Lightning's batch limit applied to an epoch of ``batches`` micro-batches (None: unknown length).

    A whole number caps the count; a fraction keeps that share of the epoch, rounded down.

    Raises:
        ConfigError: a fraction of data without a length, or one that keeps no batch.

    Example:
        >>> limit_batches(0.25, 10, "limit_train_batches"), limit_batches(3, 10, "limit_train_batches")
        (2, 3)
    """
    if limit is None:
        return batches
    if isinstance(limit, int):
        return limit if batches is None else min(limit, batches)
    if batches is None:
        raise ConfigError(f"{field}: a fraction ({limit}) needs data with a length; give a number of batches")
    kept = int(limit * batches)
    if kept == 0:
        raise ConfigError(
            f"{field}: {limit} of {batches} {what} keeps none; give a larger fraction or a number of batches"
            + hint
        )
    return kept


def fast_dev_run_settings(config: TrainConfig) -> dict[str, Any]:
    """The config fields a ``fast_dev_run`` replaces (Lightning's meaning): N training batches (1 for
    ``true``) and N eval batches in one epoch, no extra loggers. Empty when it is off.

    Example:
        >>> fast_dev_run_settings(TrainConfig(fast_dev_run=True))["limit_train_batches"]
        1
    """
    if not config.fast_dev_run:
        return {}
    batches = 1 if config.fast_dev_run is True else int(config.fast_dev_run)
    return {
        "limit_train_batches": batches,
        "limit_eval_batches": batches,
        "overfit_batches": 0,
        "max_epochs": 1,
        "max_steps": None,
        "loggers": [],
        # A run of a few steps is shorter than any warm-up: the schedule would refuse it.
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
    }
