"""TrainState, the single answer to "where are we", and FitResult, what fit() returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where the run stands. Plain numbers only, so it round-trips through JSON exactly.

    ``step`` counts optimizer steps; ``batch_in_epoch`` counts micro-batches consumed in the current
    epoch (the data position a resume starts from).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    nonfinite_skips: int = 0
    consecutive_skips: int = 0
    scaler_skips: int = 0
    last_eval_step: int | None = None
    should_stop: bool = False
    stop_reason: str | None = None
    # Free-form numbers a component wants to keep across a resume (e.g. the logging window start).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown TrainState fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        global_step: optimizer steps taken.
        epoch: epochs completed (a partial last epoch counts as started, not completed).
        train_loss: mean training loss over the whole run (per sample, or per token for (sum, count) losses).
        metrics: the last evaluation's metrics (``eval_loss``, ``eval_<name>``).
        best_metric: best value of ``metric_for_best`` seen, or None without evaluation.
        best_checkpoint: path of the checkpoint holding the best weights, when one was written.
    """

    global_step: int
    epoch: int
    train_loss: float | None
    metrics: dict[str, float]
    best_metric: float | None
    best_checkpoint: str | None
    best_step: int | None = None
    nonfinite_skips: int = 0
    stop_reason: str | None = None
    run_dir: str | None = None
