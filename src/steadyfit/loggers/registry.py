"""``TrainConfig.loggers`` -> logger objects, and the metric naming every extra logger shares."""

from __future__ import annotations

import importlib
from typing import Any

from steadyfit.config import ConfigError
from steadyfit.loggers.base import LoggerError, LoggerProtocol
from steadyfit.secrets import redact_text, secret_env_values

# name -> (module, class). Modules are imported only when their logger is asked for, so an
# optional library is never imported by a run that does not use it.
_LOGGERS: dict[str, tuple[str, str]] = {
    "csv": ("steadyfit.loggers.csv", "CSVLogger"),
    "tensorboard": ("steadyfit.loggers.tensorboard", "TensorBoardLogger"),
    "mlflow": ("steadyfit.loggers.mlflow", "MLflowLogger"),
    "wandb": ("steadyfit.loggers.wandb", "WandbLogger"),
}

# The trainer writes metrics.jsonl itself, always; naming it in ``loggers`` is allowed and adds nothing.
_BUILT_IN = ("jsonl",)

# Row keys that locate a row rather than measure something.
_POSITION_KEYS = frozenset({"kind", "step"})

# Row kinds that describe the run rather than measure it at a step: the start-up summary.
_DESCRIPTIVE_KINDS = frozenset({"start"})


def build_loggers(
    specs: list[str | LoggerProtocol], run_dir: str, config_dict: dict[str, Any]
) -> list[LoggerProtocol]:
    """The extra loggers of ``TrainConfig.loggers``, in order, without duplicates: the named ones
    constructed here, the user's objects (validated by TrainConfig) as they are.

    Args:
        specs: logger names (``csv``, ``tensorboard``, ``mlflow``, ``wandb``; ``jsonl`` is skipped) and
            objects following :class:`~steadyfit.loggers.base.LoggerProtocol`.
        run_dir: the run directory; every named logger writes its files under it by default.
        config_dict: the resolved config (secrets already removed).

    Returns:
        The loggers; the caller calls ``log_params`` on each, then ``log_row`` per row and ``close``.

    Raises:
        ConfigError: for an unknown name, or when the logger's optional library is not installed
            (the message names the extra: ``pip install steadyfit[tensorboard]``).
        LoggerError: when a logger fails to start (an unreachable tracking server...).

    Example:
        >>> loggers = build_loggers(["jsonl", "csv"], "runs/demo", {"lr": 0.1})  # doctest: +SKIP
        >>> [type(logger).__name__ for logger in loggers]  # doctest: +SKIP
        ['CSVLogger']
    """
    loggers: list[LoggerProtocol] = []
    # Names deduplicated by name, objects by identity: two equal-looking user loggers are still two sinks.
    unique = {spec if isinstance(spec, str) else id(spec): spec for spec in specs}
    for spec in unique.values():
        if not isinstance(spec, str):
            loggers.append(spec)  # the user's own, constructed by the user
        elif spec not in _BUILT_IN:
            loggers.append(_build_named(spec, run_dir, config_dict))
    return loggers


def _build_named(name: str, run_dir: str, config_dict: dict[str, Any]) -> LoggerProtocol:
    if name not in _LOGGERS:
        allowed = ", ".join((*_BUILT_IN, *_LOGGERS))
        raise ConfigError(f"loggers: unknown logger {name!r}; allowed values: {allowed}")
    module_name, class_name = _LOGGERS[name]
    logger_class = getattr(importlib.import_module(module_name), class_name)
    try:
        return logger_class(run_dir, config_dict)
    except ConfigError:
        raise
    except Exception as exc:
        # A server or library failure, not our bug: one line naming the logger, no library traceback. Its
        # text may hold a tracking URI with a password: masked, and not chained (the cause would show it).
        reason = redact_text(f"{type(exc).__name__}: {exc}", secret_env_values())
        raise LoggerError(
            f"loggers: the {name} logger could not start ({reason}); check its "
            f"settings (environment variables, server), or remove {name} from loggers"
        ) from None


def import_extra(module: str, extra: str) -> Any:
    """Import an optional library, or raise ConfigError naming the extra that installs it.

    Example:
        >>> import_extra("json", "none").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{extra}: this feature needs the optional library {module.split('.')[0]!r} ({exc}); "
            f"install it with: pip install steadyfit[{extra}]"
        ) from None


def row_kind(row: dict[str, Any]) -> str:
    """The kind of a metrics row: its ``kind`` key, else ``eval`` when it has ``eval_*`` keys, else ``train``.

    Example:
        >>> row_kind({"step": 3, "eval_loss": 0.2})
        'eval'
    """
    kind = row.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return "eval" if any(str(key).startswith("eval_") for key in row) else "train"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a row under the tag every logger uses: ``<kind>/<key>``.

    The ``<kind>_`` prefix of a key is dropped (``eval_loss`` -> ``eval/loss``), so TensorBoard, MLflow and
    W&B group a run's charts by kind. Booleans, strings, ``step`` and ``kind`` are not scalars; NaN and
    infinities are kept (a non-finite loss is worth seeing). A ``start`` row has none: its numbers
    (parameters, steps per epoch...) describe the run, they are no curve (each logger records it its way).

    Example:
        >>> scalars({"kind": "eval", "step": 10, "eval_loss": 0.4, "eval_accuracy": 0.9})
        {'eval/loss': 0.4, 'eval/accuracy': 0.9}
        >>> scalars({"kind": "start", "step": 0, "parameters": 1234, "device": "cpu"})
        {}
    """
    kind = row_kind(row)
    if kind in _DESCRIPTIVE_KINDS:
        return {}
    tags = {}
    for key, value in row.items():
        if key in _POSITION_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = str(key).removeprefix(f"{kind}_") or str(key)
        tags[f"{kind}/{name}"] = float(value)
    return tags


def row_step(row: dict[str, Any]) -> int | None:
    """The optimizer step of a row, or None when it has none (such rows carry no scalar to plot).

    Example:
        >>> row_step({"step": 7, "loss": 1.0}), row_step({"kind": "diagnostic"})
        (7, None)
    """
    step = row.get("step")
    if isinstance(step, bool) or not isinstance(step, int | float):
        return None
    return int(step)


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys, the flat names parameter dashboards want.

    Example:
        >>> flatten_params({"lr": 0.1, "optimizer": {"name": "adamw"}})
        {'lr': 0.1, 'optimizer.name': 'adamw'}
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat
