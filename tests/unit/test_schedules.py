"""Schedules: each formula at chosen steps, the lr each optimizer step sees, and exact resume."""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.schedules import (
    ONECYCLE_DEFAULT_WARMUP_RATIO,
    build_factor,
    build_scheduler,
    resolve_scheduler,
    steps_from_ratio,
    warmup_factor,
)

SCHEDULERS = typing.get_args(TrainConfig.model_fields["scheduler"].annotation)
DECAYING = ("linear", "cosine", "onecycle", "wsd")


def _factor(total_steps: int | None = 110, **fields: typing.Any) -> typing.Callable[[int], float]:
    return build_factor(TrainConfig(**fields), total_steps)


def test_warmup_is_linear_from_the_first_step_to_the_peak() -> None:
    assert [warmup_factor(k, 4) for k in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_constant() -> None:
    factor = _factor(None, scheduler="constant", warmup_steps=9)
    assert (factor(0), factor(8), factor(9), factor(10**6)) == (0.1, 0.9, 1.0, 1.0)


def test_linear() -> None:
    # Warm-up 10 steps, decay from step 10 to step 110 (100 steps) to 0.2.
    factor = _factor(scheduler="linear", warmup_steps=10, min_lr_ratio=0.2)
    assert factor(0) == 1 / 11
    assert factor(10) == 1.0
    assert factor(60) == pytest.approx(0.6, abs=1e-15)
    assert factor(85) == pytest.approx(0.2 + 0.8 * 0.25, abs=1e-15)
    assert factor(110) == 0.2
    assert factor(500) == 0.2


def test_cosine() -> None:
    factor = _factor(scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert factor(4) == 5 / 11
    assert factor(10) == 1.0
    assert factor(60) == pytest.approx(0.55, abs=1e-15)
    assert factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert factor(110) == 0.1
    assert factor(111) == 0.1


def test_step() -> None:
    factor = _factor(None, scheduler="step", warmup_steps=2, step_size=3, gamma=0.5, min_lr_ratio=0.1)
    assert [factor(k) for k in range(10)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert factor(11) == 0.125
    # Clamped at min_lr_ratio rather than decaying to 0.
    assert factor(14) == 0.1
    assert factor(10**6) == 0.1


def test_onecycle_rises_by_half_a_cosine_then_anneals() -> None:
    # Rise over steps 0..9, anneal from step 9 to step 109 (100 steps).
    factor = _factor(total_steps=109, scheduler="onecycle", warmup_steps=9, min_lr_ratio=0.0)
    assert factor(4) == pytest.approx(0.5, abs=1e-15)
    assert factor(0) == pytest.approx(0.5 * (1 - math.cos(math.pi / 10)), abs=1e-15)
    assert factor(9) == 1.0
    assert factor(59) == pytest.approx(0.5, abs=1e-15)
    assert factor(109) == 0.0
    assert factor(120) == 0.0


def test_onecycle_without_warmup_rises_over_thirty_percent() -> None:
    factor = _factor(total_steps=100, scheduler="onecycle")
    rise = steps_from_ratio(ONECYCLE_DEFAULT_WARMUP_RATIO, 100)
    assert rise == 30
    assert factor(29) < 1.0
    assert factor(30) == 1.0


def test_wsd_holds_the_peak_then_decays_as_one_minus_sqrt() -> None:
    # 100 steps, warm-up 10, decay over the last 20 (steps 80..100) to 0.1.
    factor = _factor(total_steps=100, scheduler="wsd", warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.1)
    assert factor(0) == 1 / 11
    assert factor(10) == 1.0
    assert factor(50) == 1.0
    assert factor(80) == 1.0
    assert factor(85) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.25)), abs=1e-15)
    assert factor(100) == 0.1
    assert factor(130) == 0.1


def test_warmup_ratio_is_a_fraction_of_the_total() -> None:
    factor = _factor(total_steps=200, scheduler="cosine", warmup_ratio=0.1)
    assert factor(19) == 20 / 21
    assert factor(20) == 1.0
    assert steps_from_ratio(0.1, 100) == 10
    assert steps_from_ratio(0.29, 100) == 29
    assert steps_from_ratio(0.001, 10) == 1


@pytest.mark.parametrize("scheduler", DECAYING)
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 0.3, 1 / 3, 0.7])
def test_decaying_schedules_end_exactly_at_min_lr_ratio(scheduler: str, min_lr_ratio: float) -> None:
    factor = _factor(total_steps=37, scheduler=scheduler, warmup_steps=5, min_lr_ratio=min_lr_ratio)
    assert [factor(k) for k in (37, 38, 1000)] == [min_lr_ratio] * 3
    assert factor(36) > min_lr_ratio or min_lr_ratio == 1.0


@pytest.mark.parametrize("scheduler", DECAYING)
def test_schedules_that_need_total_steps_say_so(scheduler: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"scheduler={scheduler} needs the total number.*max_steps.*max_epochs"
    ):
        _factor(None, scheduler=scheduler)


@pytest.mark.parametrize("scheduler", ["constant", "step"])
def test_warmup_ratio_needs_total_steps(scheduler: str) -> None:
    with pytest.raises(ConfigError, match=r"warmup_ratio needs the total number.*warmup_steps instead"):
        _factor(None, scheduler=scheduler, warmup_ratio=0.1)


@pytest.mark.parametrize("scheduler", DECAYING)
def test_warmup_longer_than_the_run_is_refused(scheduler: str) -> None:
    with pytest.raises(ConfigError, match=f"warmup_steps: .*scheduler={scheduler}"):
        _factor(total_steps=10, scheduler=scheduler, warmup_steps=10)


def test_step_schedule_refuses_growing_gamma() -> None:
    with pytest.raises(ConfigError, match="gamma: must be at most 1"):
        _factor(None, scheduler="step", gamma=2.0)


def _optimizer(lr: float = 0.5) -> torch.optim.Optimizer:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "lr": lr / 2}], lr=lr, foreach=True
    )


def _run(optimizer: torch.optim.Optimizer, scheduler: LRScheduler, steps: int) -> list[list[float]]:
    """The lr of every group at each optimizer step; the scheduler steps after each, as the loop does."""
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_optimizer_step_k_runs_at_base_lr_times_factor_k(scheduler_name: str) -> None:
    config = TrainConfig(scheduler=scheduler_name, warmup_steps=3, min_lr_ratio=0.05, step_size=4, gamma=0.5)
    optimizer = _optimizer(lr=0.5)
    seen = _run(optimizer, build_scheduler(optimizer, config, total_steps=20), steps=25)
    factor = build_factor(config, total_steps=20)
    assert seen == [[0.5 * factor(k), 0.25 * factor(k)] for k in range(25)]


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_restored_scheduler_continues_the_uninterrupted_lr_sequence(scheduler_name: str) -> None:
    config = TrainConfig(scheduler=scheduler_name, warmup_steps=4, min_lr_ratio=0.1, step_size=3, gamma=0.7)
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, config, total_steps=30)
    _run(optimizer, scheduler, steps=11)
    # Checkpoints keep non-tensor state as JSON: the scheduler state must survive that exactly.
    scheduler_state = json.loads(json.dumps(scheduler.state_dict()))
    optimizer_state = optimizer.state_dict()
    uninterrupted = _run(optimizer, scheduler, steps=25)

    restored_optimizer = _optimizer(lr=123.0)
    restored = build_scheduler(restored_optimizer, config, total_steps=30)
    restored_optimizer.load_state_dict(optimizer_state)
    restored.load_state_dict(scheduler_state)
    assert _run(restored_optimizer, restored, steps=25) == uninterrupted


def test_resolve_without_argument_builds_from_config() -> None:
    optimizer = _optimizer()
    scheduler = resolve_scheduler(optimizer, TrainConfig(scheduler="linear"), 10, None)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert _run(optimizer, scheduler, steps=2)[1][0] == 0.5 * 0.9


def test_resolve_accepts_a_user_scheduler_or_factory() -> None:
    optimizer = _optimizer()
    mine = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    assert resolve_scheduler(optimizer, TrainConfig(), None, mine) is mine

    other_optimizer = _optimizer()
    made = resolve_scheduler(
        other_optimizer, TrainConfig(), None, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2)
    )
    assert isinstance(made, torch.optim.lr_scheduler.StepLR)
    assert made.optimizer is other_optimizer


def test_resolve_refuses_unusable_schedulers() -> None:
    optimizer = _optimizer()
    with pytest.raises(TypeError, match=r"expected None, a torch\.optim\.lr_scheduler\.LRScheduler"):
        resolve_scheduler(optimizer, TrainConfig(), None, "cosine")
    with pytest.raises(TypeError, match="factory returned float"):
        resolve_scheduler(optimizer, TrainConfig(), None, lambda opt: 0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    with pytest.raises(TypeError, match="ReduceLROnPlateau needs a metric"):
        resolve_scheduler(optimizer, TrainConfig(), None, plateau)
    elsewhere = torch.optim.lr_scheduler.StepLR(_optimizer(), 2)
    with pytest.raises(ValueError, match="different optimizer"):
        resolve_scheduler(optimizer, TrainConfig(), None, elsewhere)
