"""The logger protocol every metrics sink follows (built-in or the user's own) and the no-op Logger base."""

from __future__ import annotations

import inspect
from typing import Any, Literal, Protocol, runtime_checkable

# The methods a logger object must have, in the order the run calls them.
LOGGER_METHODS = ("log_params", "log_row", "log_artifact", "close")

# How a run ended, for a logger whose close takes ``outcome``: "failed" is an exception, "preempted" a
# SIGTERM or SIGINT (or KeyboardInterrupt) that stopped it.
RunOutcome = Literal["finished", "failed", "preempted"]


class LoggerError(RuntimeError):
    """An extra logger could not start (a tracking server unreachable, credentials refused...)."""


@runtime_checkable
class LoggerProtocol(Protocol):
    """What the run calls on a logger, on rank 0 only: ``log_params`` once (after a resume too), ``log_row``
    for every row of metrics.jsonl in file order, ``log_artifact`` for the final weights, ``close`` once at
    the end of fit (also after an error). A ``close`` that takes an ``outcome`` keyword (or ``**kwargs``)
    hears how the run ended, as a :data:`RunOutcome`; one without it is called with no argument.

    Any object with these four methods can go in ``TrainConfig.loggers`` beside the built-in names (Python
    only); subclass :class:`Logger` to inherit no-op defaults for the methods you do not need.

    Example:
        >>> class Rows:
        ...     def __init__(self): self.rows = []
        ...     def log_params(self, params): pass
        ...     def log_row(self, row): self.rows.append(row)
        ...     def log_artifact(self, path): pass
        ...     def close(self): pass
        >>> isinstance(Rows(), LoggerProtocol)
        True
    """

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the resolved config (plain data, secrets already masked)."""

    def log_row(self, row: dict[str, Any]) -> None:
        """Record one metrics row (a plain dict of JSON-ready values; NaN stays a float here)."""

    def log_artifact(self, path: str) -> None:
        """Record a file produced by the run (the final weights)."""

    def close(self) -> None:
        """Flush and release resources."""


def missing_methods(candidate: object) -> list[str]:
    """The methods of :class:`LoggerProtocol` that ``candidate`` lacks (or has as non-callables).

    Example:
        >>> missing_methods(object())
        ['log_params', 'log_row', 'log_artifact', 'close']
    """
    return [name for name in LOGGER_METHODS if not callable(getattr(candidate, name, None))]


def close_logger(logger: LoggerProtocol, outcome: RunOutcome) -> None:
    """Call ``logger.close``, with ``outcome=`` when its close accepts that keyword: loggers written before
    close learned the outcome (``def close(self)``) keep working.

    Example:
        >>> class Status(Logger):
        ...     def close(self, outcome="finished"):
        ...         print(outcome)
        >>> close_logger(Status(), "failed")
        failed
        >>> close_logger(Logger(), "failed")  # close() takes no outcome: called without one
    """
    if _takes_outcome(logger.close):
        logger.close(outcome=outcome)  # type: ignore[call-arg]
    else:
        logger.close()


def _takes_outcome(close: Any) -> bool:
    try:
        parameters = inspect.signature(close).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature (some builtins): call it bare
        return False
    return any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        or (parameter.name == "outcome" and parameter.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for parameter in parameters
    )


class Logger:
    """A sink for run parameters and metric rows, following :class:`LoggerProtocol` with no-op defaults.
    Only rank 0 ever constructs the built-in loggers.

    Rows are plain dicts of JSON-ready values. A train row carries ``step, epoch, loss, lr, grad_norm,
    samples_per_sec`` (and more); an eval row carries ``step`` and ``eval_*`` keys; a row may carry
    ``kind`` ("start", "train", "eval", "diagnostic", "summary"). Subclasses override what they need.

    Example:
        >>> class PrintLoss(Logger):
        ...     def log_row(self, row):
        ...         if row.get("kind") == "train":
        ...             print(row["step"], row["loss"])
        >>> PrintLoss().log_row({"kind": "train", "step": 10, "loss": 0.5})
        10 0.5
    """

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the resolved config once at the start (secrets already removed)."""

    def log_row(self, row: dict[str, Any]) -> None:
        """Record one metrics row."""

    def log_artifact(self, path: str) -> None:
        """Record a file produced by the run (final weights), where the tool supports it."""

    def close(self) -> None:
        """Flush and release resources; called once at the end of fit, also after an error."""
