"""Every schedule stays in [0, 1], never drops below min_lr_ratio after warm-up, and never rises after it."""

from __future__ import annotations

import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from steadyfit.config import TrainConfig
from steadyfit.schedules import build_factor, steps_from_ratio


@st.composite
def schedules(draw: st.DrawFn) -> tuple[TrainConfig, int]:
    scheduler = draw(st.sampled_from(["constant", "linear", "cosine", "step", "onecycle", "wsd"]))
    total_steps = draw(st.integers(min_value=1, max_value=1000))
    warmup_steps = draw(st.integers(min_value=0, max_value=total_steps - 1))
    warmup_ratio = draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=0.99)))
    # A ratio that rounds up to the whole run is refused by build_factor (tested in tests/unit).
    assume(steps_from_ratio(warmup_ratio, total_steps) < total_steps)
    config = TrainConfig(
        scheduler=scheduler,
        warmup_steps=0 if warmup_ratio else warmup_steps,
        warmup_ratio=warmup_ratio,
        min_lr_ratio=draw(st.floats(min_value=0.0, max_value=1.0)),
        decay_ratio=draw(st.floats(min_value=1e-6, max_value=1.0)),
        step_size=draw(st.integers(min_value=1, max_value=500)),
        gamma=draw(st.floats(min_value=1e-6, max_value=1.0)),
    )
    return config, total_steps


@settings(max_examples=150, deadline=None, database=None)
@given(schedules())
def test_factor_bounds_and_shape(schedule: tuple[TrainConfig, int]) -> None:
    config, total_steps = schedule
    factor = build_factor(config, total_steps)
    values = [factor(step) for step in range(total_steps + 3)]
    assert all(0.0 <= value <= 1.0 for value in values)

    peak = values.index(1.0)
    assert all(a <= b for a, b in itertools.pairwise(values[: peak + 1])), "warm-up must rise"
    after_warmup = values[peak:]
    assert all(a >= b for a, b in itertools.pairwise(after_warmup)), "must not rise again"
    if config.scheduler != "constant":
        assert all(value >= config.min_lr_ratio for value in after_warmup)
    if config.scheduler in ("linear", "cosine", "onecycle", "wsd"):
        assert values[total_steps:] == [config.min_lr_ratio] * 3
