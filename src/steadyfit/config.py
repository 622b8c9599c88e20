"""TrainConfig: every knob of a run, validated, with YAML files and ``key=value`` overrides."""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from steadyfit.foreign_names import foreign_name_hint, foreign_value_hint
from steadyfit.loggers.base import LOGGER_METHODS, LoggerProtocol, missing_methods


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the field and what is allowed."""


MAX_SEED = 2**32 - 1

# A cadence in optimizer steps (0: off), or "epoch": at the end of every epoch.
Interval = Annotated[int, Field(ge=0)] | Literal["epoch"]
# Lightning's batch limits: a whole number of batches, or a fraction of the epoch's batches.
BatchLimit = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, le=1)]

LoggerName = Literal["jsonl", "csv", "tensorboard", "mlflow", "wandb"]
LOGGER_NAMES: tuple[str, ...] = get_args(LoggerName)


def _logger_entry(value: Any) -> str | LoggerProtocol:
    """One ``loggers`` entry: a built-in logger's name or (Python only) an object with the logger methods."""
    if isinstance(value, str):
        if value not in LOGGER_NAMES:
            # Pydantic's own wording for a Literal, so the message reads like every other bad value.
            allowed = ", ".join(repr(name) for name in LOGGER_NAMES[:-1]) + f" or {LOGGER_NAMES[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": allowed})
        return value
    missing = missing_methods(value)
    if missing:
        raise ValueError(
            f"{type(value).__name__} is not a logger: it lacks {', '.join(missing)} (a logger object needs "
            f"{', '.join(LOGGER_METHODS)}; subclass steadyfit.Logger for no-op defaults), or give one of "
            f"the names {', '.join(LOGGER_NAMES)}"
        )
    return value


# A logger's name, or an object following steadyfit.loggers.base.LoggerProtocol (config.yaml: its class name).
LoggerSpec = Annotated[LoggerName | LoggerProtocol, PlainValidator(_logger_entry)]

# What each union-typed field allows, in words. Pydantic reports one error per member of the union
# ("eval_every.constrained-int: ...; eval_every.literal['epoch']: ..."); a user wants one line per field.
_UNION_ALLOWED = {
    "eval_every": "a whole number of steps >= 0 (0: off), 'epoch', or null (every epoch)",
    "log_every": "a whole number of steps >= 0 (0: off), or 'epoch'",
    "save_every": "a whole number of steps >= 0 (0: off), or 'epoch'",
    "limit_train_batches": "a whole number of batches >= 1, a fraction of the batches in (0, 1], or null",
    "limit_eval_batches": "a whole number of batches >= 1, a fraction of the batches in (0, 1], or null",
    "overfit_batches": "a whole number of batches >= 1, a fraction of the batches in (0, 1], or 0 (off)",
    "fast_dev_run": "true, false, or a whole number of batches >= 0",
    "gradient_checkpointing": "true, false, or a list of module names",
    "micro_batch_size": "a whole number >= 1, 'auto', or null",
}


class TrainConfig(BaseModel):
    """Everything a run needs to know, flat, with the same names in Python, YAML and on the command line.

    Example:
        >>> config = TrainConfig(run_dir="runs/demo", max_epochs=3, batch_size=64, lr=3e-4)
        >>> config.grad_accum_steps
        1
    """

    # allow_inf_nan=False: no float field has a meaning for inf or NaN (an off switch is null or 0), and an
    # infinite lr or weight decay would only surface later as NaN weights.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    run_dir: str = "runs/default"
    seed: int = 0
    max_epochs: int | None = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    max_grad_norm: float | None = Field(default=None, gt=0)
    clip_value: float | None = Field(default=None, gt=0)
    optimizer: Literal["sgd", "adam", "adamw", "adafactor", "lamb", "lion"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    scheduler: Literal["constant", "linear", "cosine", "step", "onecycle", "wsd"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    decay_ratio: float = Field(default=0.2, gt=0, le=1)
    step_size: int = Field(default=1000, ge=1)
    gamma: float = Field(default=0.1, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: Interval | None = None
    log_every: Interval = 10
    save_every: Interval = 0
    keep_last: int = Field(default=3, ge=1)
    keep_best: int = Field(default=1, ge=1)
    eval_on_start: bool = False
    metric_for_best: str | None = None
    greater_is_better: bool | None = None
    load_best_at_end: bool = False
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_threshold: float = Field(default=0.0, ge=0)
    resume: str = "auto"
    num_workers: int = Field(default=0, ge=0)
    persistent_workers: bool = False
    deterministic: bool = False
    compile: bool = False
    loggers: list[LoggerSpec] = Field(default_factory=list)
    on_nonfinite: Literal["skip", "raise"] = "skip"
    max_consecutive_skips: int = Field(default=10, ge=1)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_blocks: list[str] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress: bool = True
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    diagnostics: bool = True
    stop_on: list[str] = Field(default_factory=list)
    diagnostic_thresholds: dict[str, float] = Field(default_factory=dict)
    micro_batch_size: int | Literal["auto"] | None = None
    gradient_checkpointing: bool | list[str] = False
    fast_dev_run: bool | Annotated[int, Field(ge=0)] = False
    limit_train_batches: BatchLimit | None = None
    limit_eval_batches: BatchLimit | None = None
    overfit_batches: BatchLimit | Literal[0] = 0

    if not TYPE_CHECKING:
        # Hidden from type checkers, which keep the field-by-field signature pydantic gives them.
        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except ValidationError as exc:
                raise ConfigError(_describe_validation_error(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # validate_assignment: `config.lr = -1` fails like `TrainConfig(lr=-1)`, with the same ConfigError.
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(_describe_validation_error(exc)) from None

    @classmethod
    def from_hf(cls, args: Any, **overrides: Any) -> TrainConfig:
        """The config of a Hugging Face ``TrainingArguments`` (or of its ``to_dict()``), field by field.

        Every setting steadyfit has is translated, Hugging Face defaults included (its lr 5e-5, batch 8,
        linear schedule, ``max_grad_norm`` 1.0, saving every 500 steps...), so the run trains as the Hugging
        Face Trainer would. docs/migrating.md lists the translations. A setting left at its Hugging Face
        default does not count as set by you: a DataLoader passed as ``train_data`` or ``eval_data`` still
        decides its own batch size and workers (an explicit contrary ``per_device_train_batch_size`` is
        refused, as for any config).

        Args:
            args: a ``transformers.TrainingArguments``, or the dict of its ``to_dict()``.
            **overrides: TrainConfig fields that replace the translated values.

        Returns:
            The TrainConfig.

        Raises:
            ConfigError: (a ValueError) listing, in one message, every setting that differs from the
                ``TrainingArguments`` default and that steadyfit cannot honour (a fractional
                ``num_train_epochs``, ``tf32``, ``fsdp``, ...); or when transformers is missing
                (``pip install 'steadyfit[hf]'``); or for an invalid override.
            TypeError: ``args`` is neither a ``TrainingArguments`` nor a mapping.

        Example:
            >>> from transformers import TrainingArguments  # doctest: +SKIP
            >>> args = TrainingArguments(output_dir="out", learning_rate=3e-4, bf16=True)  # doctest: +SKIP
            >>> config = TrainConfig.from_hf(args, max_steps=1000)  # doctest: +SKIP
            >>> config.lr, config.precision, config.run_dir  # doctest: +SKIP
            (0.0003, 'bf16', 'out')
        """
        # Imported here: hf_arguments builds on this module.
        from steadyfit.hf_arguments import config_values_from_hf, fields_left_at_hf_default

        config = cls(**{**config_values_from_hf(args, overrides), **overrides})
        # A Hugging Face default the user never touched is not their choice: it must not overrule the
        # batch size or workers of a DataLoader they pass (data.loader_settings reads model_fields_set).
        # The values stay as validated above; only which fields count as set changes.
        untouched = fields_left_at_hf_default(args) - overrides.keys()
        return cls.model_construct(_fields_set=config.model_fields_set - untouched, **dict(config))

    @field_validator("run_dir")
    @classmethod
    def _names_a_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory (empty would put the run in the current directory)")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int) -> int:
        # numpy's seed range (Lightning's too): python, numpy and torch all accept it; larger ones overflow.
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be an integer from 0 to {MAX_SEED} (2**32 - 1)")
        return value

    @field_validator("loggers", "stop_on", "fsdp_blocks", mode="before")
    @classmethod
    def _names_from_text(cls, value: Any) -> Any:
        # `loggers=tensorboard` or `loggers=csv,mlflow` on the command line: YAML reads them as one string.
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_serializer("loggers", when_used="json")
    def _logger_names(self, loggers: list[str | LoggerProtocol]) -> list[str]:
        # config.yaml and logger params stay plain data: a logger object is recorded by its class name.
        return [logger if isinstance(logger, str) else type(logger).__name__ for logger in loggers]

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError("both betas must be in [0, 1)")
        return value

    @field_validator("resume")
    @classmethod
    def _resume_mode(cls, value: str) -> str:
        if not value:
            raise ValueError("must be 'auto', 'never' or the path of a checkpoint directory")
        return value

    @field_validator("micro_batch_size")
    @classmethod
    def _positive_micro_batch(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer, 'auto' or null")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("max_epochs / max_steps: set at least one of them")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps / warmup_ratio: set one of them, not both")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov: needs optimizer=sgd and momentum > 0")
        if self.eval_every == 0:
            # Without periodic evaluation the run evaluates once, at its end: nothing to choose from, nothing
            # to stop early on, so these settings would be ignored silently.
            if self.load_best_at_end:
                raise ValueError("load_best_at_end: needs evaluation (eval_every is 0)")
            if self.early_stopping_patience is not None:
                raise ValueError("early_stopping_patience: needs periodic evaluation (eval_every is 0)")
            if self.keep_best > 1:
                raise ValueError("keep_best: needs periodic evaluation (eval_every is 0)")
        return self

    @property
    def resolved_eval_batch_size(self) -> int:
        """The eval batch size, defaulting to ``batch_size``."""
        return self.eval_batch_size or self.batch_size

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data for config.yaml (tuples as lists, logger objects by their class names)."""
        return self.model_dump(mode="json")


# Bounds on a bad value echoed in an error: a few hundred bytes of YAML aliases expand to millions of
# items, whose whole repr would be hundreds of megabytes on one line.
_ECHO = reprlib.Repr()
_ECHO.maxlevel = 2
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxset = _ECHO.maxdict = 8
_ECHO.maxstring = _ECHO.maxother = 100
_MAX_ECHO_CHARS = 120


def _echo(value: Any) -> str:
    """``repr(value)`` bounded to one short clause: nested and long values end in ``...``."""
    text = _ECHO.repr(value)
    return text if len(text) <= _MAX_ECHO_CHARS else text[: _MAX_ECHO_CHARS - 3] + "..."


def _describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field and what it allows: the message of every config ConfigError."""
    described: list[str] = []
    collapsed: set[str] = set()
    for detail in error.errors():
        field = str(detail["loc"][0]) if detail["loc"] else ""
        if field in _UNION_ALLOWED and len(detail["loc"]) > 1:
            # A union member's error: the first one stands for the field (its input is the whole value).
            if field not in collapsed:
                collapsed.add(field)
                described.append(f"{field}: got {_echo(detail['input'])}; allowed: {_UNION_ALLOWED[field]}")
            continue
        described.append(_describe_error(detail))
    return "invalid config: " + "; ".join(described)


def _describe_error(error: ErrorDetails) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "config"
    kind = error["type"]
    if kind in ("extra_forbidden", "no_such_attribute"):
        return describe_unknown_field(field)
    message = error["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        foreign = foreign_value_hint(field, error.get("input"))
        close = None if foreign else _closest_value(field, error.get("input"))
        suggestion = f" (did you mean {close!r}?)" if close else ""
        message = f"{field}: got {_echo(error.get('input'))}{suggestion}; allowed values: {expected}"
    elif field == "config":
        return message
    else:
        message = f"{field}: {message} (got {_echo(error.get('input'))})"
    hint = foreign_value_hint(field, error.get("input"))
    return f"{message}; {hint}" if hint else message


def describe_unknown_field(name: str) -> str:
    """``NAME: unknown field`` with another trainer's name for it, or the closest of ours."""
    # Another trainer's name first: difflib would offer our distributed `strategy` for `save_strategy`.
    hint = foreign_name_hint(name)
    if hint:
        return f"{name}: unknown field; {hint}"
    close = _closest_field(name)
    suggestion = f" (did you mean '{close}'?)" if close else ""
    return f"{name}: unknown field{suggestion}; allowed fields: {', '.join(TrainConfig.model_fields)}"


def _closest_value(field: str, value: Any) -> str | None:
    """The allowed string of a choice field that ``value`` spells in other letter cases (``adam`` for
    ``Adam``). Only the case: a close spelling may be another thing (``adagrad`` is no ``adam``)."""
    model_field = TrainConfig.model_fields.get(field)
    if model_field is None or not isinstance(value, str):
        return None
    allowed = [choice for choice in _literal_choices(model_field.annotation) if isinstance(choice, str)]
    return next((choice for choice in allowed if choice.lower() == value.lower()), None)


def _literal_choices(annotation: Any) -> list[Any]:
    """The values of the Literal types inside ``annotation`` (through unions and Optional)."""
    if getattr(annotation, "__origin__", None) is Literal:
        return list(get_args(annotation))
    return [choice for member in get_args(annotation) for choice in _literal_choices(member)]


def _closest_field(name: str) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, list(TrainConfig.model_fields), n=1)
    return matches[0] if matches else None


def check_field_value(name: str, value: Any) -> None:
    """Check one value against the type and bounds of TrainConfig field ``name`` alone (not against the
    other fields: a sweep varies several together).

    Raises:
        ConfigError: ``FIELD: ...`` as :func:`make_config` words it.

    Example:
        >>> check_field_value("batch_size", 0)
        Traceback (most recent call last):
        ...
        steadyfit.config.ConfigError: batch_size: Input should be greater than or equal to 1 (got 0)
    """
    field = TrainConfig.model_fields[name]
    annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
    try:
        TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False)).validate_python(value)
    except ValidationError as exc:
        details = [{**detail, "loc": (name, *detail["loc"])} for detail in exc.errors()]
        raise ConfigError(_describe_error(details[0])) from None


def make_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from plain data, turning validation errors into one clear ConfigError.

    Raises:
        ConfigError: naming each bad field and what it allows.
    """
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        # A key that is not a string (`1: 3` in a YAML file) never reaches validation.
        raise ConfigError(f"invalid config: {exc}") from None


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` arguments; values are YAML scalars or lists (``lr=3e-4``, ``betas=[0.9,0.95]``).

    Raises:
        ConfigError: for an argument without ``=`` or with an unparsable value.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key):
            raise ConfigError(f"override {item!r}: expected key=value, for example lr=3e-4")
        overrides[key] = parse_scalar(raw, key)
    return overrides


def parse_scalar(raw: str, key: str) -> Any:
    """Read one override value as YAML, so ``3e-4`` is a float and ``[a, b]`` a list."""
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {raw!r} ({exc.problem})") from None
    # PyYAML reads '3e-4' as a string (YAML 1.1 wants a dot); users mean a number.
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value):
            return number
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently, so
    an edit lower in the file would quietly undo one above it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader.

    Raises:
        ConfigError: when the file is missing, unreadable or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no Python object
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (a caret under the spot): one line, as every config error is.
        where = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML: {problem}{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, str):
            data[key] = parse_scalar(value, str(key))
    return data
