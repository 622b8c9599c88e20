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
    # What judged best_metric ("eval_loss, lower is better"): a resume with another metric_for_best or
    # greater_is_better starts the tracking over instead of comparing against another metric's best.
    best_judged_by: str | None = None
    # The evaluations whose checkpoints rotation keeps (keep_best): [step, metric] pairs, the best first.
    kept_best: list[list[Any]] = field(default_factory=list)
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
        """Inverse of :meth:`to_dict`; unknown keys or values of the wrong type are an error, missing keys
        take their defaults.

        Raises:
            ValueError: naming the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"TrainState: expected a mapping, got {type(data).__name__}")
        unknown = set(data) - set(_FIELD_TYPES)
        if unknown:
            raise ValueError(f"unknown TrainState fields: {sorted(unknown)}")
        for name, value in data.items():
            allowed = _FIELD_TYPES[name]
            # bool is an int in Python; a count must not be True.
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ValueError(f"TrainState.{name}: {value!r} is not of type {allowed}")
        return cls(**data)

    def summary_row(self) -> dict[str, Any]:
        """The ``kind: "summary"`` row that ends metrics.jsonl."""
        return {
            "kind": "summary",
            "step": self.step,
            "epoch": self.epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "nonfinite_skips": self.nonfinite_skips,
            "scaler_skips": self.scaler_skips,
            "stop_reason": self.stop_reason,
        }

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint component: :meth:`to_dict`."""
        return self.to_dict()

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Replace every field in place (callbacks holding this object see the restored state)."""
        restored = TrainState.from_dict(data)
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(restored, item.name))


_COUNT = (int,)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "step": _COUNT,
    "epoch": _COUNT,
    "batch_in_epoch": _COUNT,
    "samples_seen": _COUNT,
    "tokens_seen": _COUNT,
    "best_metric": (int, float, type(None)),
    "best_step": (int, type(None)),
    "best_checkpoint": (str, type(None)),
    "best_judged_by": (str, type(None)),
    "kept_best": (list,),
    "evals_without_improvement": _COUNT,
    "nonfinite_skips": _COUNT,
    "consecutive_skips": _COUNT,
    "scaler_skips": _COUNT,
    "last_eval_step": (int, type(None)),
    "should_stop": (bool,),
    "stop_reason": (str, type(None)),
    "extra": (dict,),
}


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        global_step: optimizer steps taken.
        epoch: epochs completed (a partial last epoch counts as started, not completed).
        train_loss: mean training loss over the whole run (per sample, or per token for (sum, count) losses).
        metrics: the last evaluation's metrics (``eval_loss``, ``eval_<name>``); after a resume that has not
            evaluated yet (a rerun of a finished run), the last ones metrics.jsonl holds.
        best_metric: best value of ``metric_for_best`` seen, or None without evaluation.
        best_checkpoint: path of the checkpoint holding the best weights, when one was written.
        best_step: the step of the best evaluation, or None.
        nonfinite_skips: optimizer steps skipped for a non-finite loss or gradient (``on_nonfinite=skip``).
        stop_reason: why training stopped early (early stopping, a callback or diagnostic asking), or None.
        run_dir: the run directory.
        scaler_skips: fp16 steps the loss scaler skipped to lower its scale (gradients over float16's range
            at a scale of at least 1; 0 in other precisions).
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
    scaler_skips: int = 0
