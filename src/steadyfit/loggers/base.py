"""The Logger interface every metrics sink implements (metrics.jsonl, CSV, TensorBoard, MLflow, W&B)."""

from __future__ import annotations

from typing import Any


class LoggerError(RuntimeError):
    """An extra logger could not start (a tracking server unreachable, credentials refused...)."""


class Logger:
    """A sink for run parameters and metric rows. Only rank 0 ever constructs loggers.

    Rows are plain dicts of JSON-ready values. A train row carries ``step, epoch, loss, lr, grad_norm,
    samples_per_sec`` (and more); an eval row carries ``step`` and ``eval_*`` keys; a row may carry
    ``kind`` ("train", "eval", "diagnostic"). Subclasses override what they need.
    """

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the resolved config once at the start (secrets already removed)."""

    def log_row(self, row: dict[str, Any]) -> None:
        """Record one metrics row."""

    def log_artifact(self, path: str) -> None:
        """Record a file produced by the run (final weights), where the tool supports it."""

    def close(self) -> None:
        """Flush and release resources; called once at the end of fit, also after an error."""
