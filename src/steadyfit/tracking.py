"""Best-metric tracking and early stopping: the loop's own, not callbacks."""

from __future__ import annotations

import math
from typing import Any

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.state import TrainState

_LOWER_IS_BETTER_WORDS = ("loss", "error", "perplexity", "ppl", "mse", "mae", "rmse", "wer", "cer")


def metric_key(name: str) -> str:
    """``accuracy`` and ``eval_accuracy`` name the same eval metric."""
    return name if name.startswith("eval_") else f"eval_{name}"


def infer_greater_is_better(name: str) -> bool:
    """Loss-like names (loss, error, perplexity...) are better when lower; anything else when higher."""
    lowered = name.lower()
    return not any(word in lowered for word in _LOWER_IS_BETTER_WORDS)


class BestTracker:
    """Keeps the best value of ``metric_for_best`` and counts evaluations without improvement.

    Example:
        >>> tracker = BestTracker("eval_loss", None, patience=2, threshold=0.0)
        >>> state = TrainState()
        >>> tracker.update(state, {"eval_loss": 1.0}), tracker.update(state, {"eval_loss": 1.5})
        (True, False)
    """

    def __init__(
        self, metric: str, greater_is_better: bool | None, patience: int | None, threshold: float
    ) -> None:
        self.metric = metric_key(metric)
        self.greater_is_better = (
            infer_greater_is_better(self.metric) if greater_is_better is None else greater_is_better
        )
        self.patience = patience
        self.threshold = threshold

    @property
    def judged_by(self) -> str:
        """The metric and its direction, as the state records them beside the best value."""
        return f"{self.metric}, {'higher' if self.greater_is_better else 'lower'} is better"

    def take_over(self, state: TrainState) -> str | None:
        """After a resume: a best value (and the kept checkpoints, the patience count) that another metric or
        direction judged is forgotten, and the tracking starts over; returns what judged it then, or None
        when nothing was forgotten.

        Example:
            >>> state = TrainState(best_metric=0.9, best_judged_by="eval_accuracy, higher is better")
            >>> BestTracker("eval_loss", None, None, 0.0).take_over(state), state.best_metric
            ('eval_accuracy, higher is better', None)
        """
        before = state.best_judged_by
        if before is None or before == self.judged_by:
            return None
        state.best_metric = state.best_step = state.best_checkpoint = state.best_judged_by = None
        state.kept_best = []
        state.evals_without_improvement = 0
        return before

    def is_improvement(self, value: float, best: float | None) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.greater_is_better:
            return value > best + self.threshold
        return value < best - self.threshold

    def update(self, state: TrainState, metrics: dict[str, float]) -> bool:
        """Record one evaluation; returns whether it is the new best. Sets ``should_stop`` on patience."""
        if self.metric not in metrics:
            raise KeyError(
                f"metric_for_best: {self.metric!r} is not among the eval metrics {sorted(metrics)}; "
                "name one of them"
            )
        value = float(metrics[self.metric])
        improved = self.is_improvement(value, state.best_metric)
        state.best_judged_by = self.judged_by
        if improved:
            state.best_metric = value
            state.best_step = state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            if self.patience is not None and state.evals_without_improvement >= self.patience:
                state.should_stop = True
                state.stop_reason = (
                    f"early stopping: {self.metric} did not improve for {self.patience} evaluations "
                    f"(best {state.best_metric} at step {state.best_step})"
                )
        return improved

    def keep(self, state: TrainState, metrics: dict[str, float], keep_best: int) -> bool:
        """Record this evaluation among the ``keep_best`` whose checkpoints are kept; returns whether it is
        one of them. The best (as :meth:`update` judged it, threshold included) is always kept, the others
        are the next best values. Call after :meth:`update`.

        Example:
            >>> tracker, state = BestTracker("eval_loss", None, None, 0.0), TrainState()
            >>> for state.step, loss in ((1, 0.5), (2, 0.9), (3, 0.7)):
            ...     _ = tracker.update(state, {"eval_loss": loss})
            ...     _ = tracker.keep(state, {"eval_loss": loss}, keep_best=2)
            >>> state.kept_best
            [[1, 0.5], [3, 0.7]]
        """
        candidates = {step: value for step, value in state.kept_best}
        value = float(metrics[self.metric])
        if not math.isnan(value):
            candidates[state.step] = value
        best = state.best_step
        others = sorted(
            (step for step in candidates if step != best),
            key=lambda step: candidates[step],
            reverse=self.greater_is_better,
        )
        kept = ([best] if best in candidates else []) + others[: keep_best - 1]
        state.kept_best = [[step, candidates[step]] for step in kept]
        return state.step in kept


def build_tracker(config: TrainConfig, metrics: dict[str, Any], has_eval_data: bool) -> BestTracker | None:
    """The run's tracker of ``metric_for_best`` (``eval_loss`` by default); None without eval data.

    Raises:
        ConfigError: best tracking or early stopping asked for without eval data, or ``metric_for_best``
            naming no eval metric.
    """
    if not has_eval_data:
        if (
            config.load_best_at_end
            or config.early_stopping_patience
            or config.metric_for_best
            or config.keep_best > 1
        ):
            raise ConfigError(
                "eval_data: metric_for_best, load_best_at_end, early_stopping_patience and keep_best need "
                "eval_data"
            )
        return None
    metric = config.metric_for_best or "eval_loss"
    known = {"eval_loss", *(metric_key(name) for name in metrics)}
    if metric_key(metric) not in known:
        raise ConfigError(f"metric_for_best: {metric!r} is not an eval metric; allowed: {sorted(known)}")
    return BestTracker(
        metric, config.greater_is_better, config.early_stopping_patience, config.early_stopping_threshold
    )
