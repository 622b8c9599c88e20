"""A Hugging Face ``TrainingArguments`` as TrainConfig values: what translates, and what is refused."""

from __future__ import annotations

import functools
import math
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

from steadyfit.config import ConfigError
from steadyfit.foreign_names import HF_OPTIMIZERS, HF_OPTIMIZERS_REFUSED, HF_SCHEDULERS, MIGRATING_DOC
from steadyfit.horizons import steps_from_ratio
from steadyfit.secrets import redact, secret_env_values

__all__ = ["config_values_from_hf", "fields_left_at_hf_default"]

# One setting for one field, same meaning and units: TrainingArguments name -> TrainConfig name.
_RENAMED = {
    "output_dir": "run_dir",
    "seed": "seed",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "learning_rate": "lr",
    "weight_decay": "weight_decay",
    "adam_epsilon": "eps",
    "dataloader_num_workers": "num_workers",
    "dataloader_persistent_workers": "persistent_workers",
    "full_determinism": "deterministic",
    "torch_compile": "compile",
    "load_best_model_at_end": "load_best_at_end",
    "metric_for_best_model": "metric_for_best",
    "greater_is_better": "greater_is_better",
    "eval_on_start": "eval_on_start",
}

# Names, logging and Hub settings change no number of the run: any value is accepted and unused (push_to_hub
# is not here: a run that should upload is refused). Memory is pinned whenever the device is CUDA; eval
# outputs stay on the device (eval_accumulation_steps only moves Hugging Face's to the host sooner).
_IGNORED = frozenset(
    {
        "logging_dir",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "hub_token",
        "hub_private_repo",
        "hub_model_id",
        "hub_strategy",
        "hub_always_push",
        "hub_revision",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "local_rank",
        "do_train",
        "do_eval",
        "do_predict",
        "overwrite_output_dir",
        "skip_memory_metrics",
        "dataloader_pin_memory",
        "eval_accumulation_steps",
    }
)

_LOGGERS = ("tensorboard", "mlflow", "wandb")


def config_values_from_hf(args: Any, overridden: Iterable[str] = ()) -> dict[str, Any]:
    """TrainConfig values for a ``TrainingArguments`` (or its ``to_dict()``); :meth:`TrainConfig.from_hf`.

    Args:
        args: a ``transformers.TrainingArguments``, or the dict of its ``to_dict()``.
        overridden: the TrainConfig fields the caller sets instead; ``optim`` is then not translated nor
            refused when ``optimizer`` is among them (``optim='adafactor'`` with an ``optimizer`` override).

    Returns:
        Plain TrainConfig values, Hugging Face defaults translated too.

    Raises:
        ConfigError: one message listing every setting that differs from the ``TrainingArguments`` default
            and that steadyfit cannot honour; or transformers is missing.
        TypeError: ``args`` is neither a ``TrainingArguments`` nor a mapping.

    Example:
        >>> values = config_values_from_hf({"learning_rate": 3e-4, "bf16": True})  # doctest: +SKIP
        >>> values["lr"], values["precision"]  # doctest: +SKIP
        (0.0003, 'bf16')
    """
    translation = _Translation(_given_settings(args), _hf_defaults(), set(overridden))
    translation.translate()
    return translation.finish()


def fields_left_at_hf_default(args: Any) -> set[str]:
    """The TrainConfig fields whose ``TrainingArguments`` setting (one to one, :data:`_RENAMED`) is absent
    or equal to its Hugging Face default: :meth:`TrainConfig.from_hf` carries their values over but does not
    count them as set by the user, so a DataLoader of the user's may still decide ``batch_size``,
    ``num_workers``, ``eval_batch_size`` or ``persistent_workers``.

    Example:
        >>> sorted(fields_left_at_hf_default({"learning_rate": 3e-4}))[:3]  # doctest: +SKIP
        ['batch_size', 'compile', 'deterministic']
    """
    given = _given_settings(args)
    defaults = _hf_defaults()
    return {
        ours
        for theirs, ours in _RENAMED.items()
        if given.get(theirs, defaults.get(theirs)) == defaults.get(theirs)
    }


def _given_settings(args: Any) -> dict[str, Any]:
    """The settings of a ``TrainingArguments`` or of its ``to_dict()``, as a plain dict."""
    if isinstance(args, Mapping):
        return dict(args)
    if callable(getattr(args, "to_dict", None)):
        return args.to_dict()
    raise TypeError(f"from_hf: expected a TrainingArguments or its to_dict(), got {type(args).__name__}")


@functools.cache
def _hf_defaults() -> dict[str, Any]:
    # A fresh instance, not the dataclass defaults: __post_init__ settles several of them (report_to
    # "none" -> [], activation_checkpointing None -> False, disable_tqdm from the log level).
    try:
        from transformers import TrainingArguments

        return TrainingArguments(output_dir="trainer_output").to_dict()
    except ImportError as exc:
        # transformers 5 also needs accelerate to build a TrainingArguments.
        raise ConfigError(
            f"TrainConfig.from_hf needs transformers: pip install 'steadyfit[hf]' ({exc})"
        ) from None


class _Translation:
    """One pass over the given settings: each is translated, refused, or compared with its default."""

    def __init__(self, given: dict[str, Any], defaults: dict[str, Any], overridden: set[str]) -> None:
        self.given = given
        self.defaults = defaults
        self.overridden = overridden
        self.values: dict[str, Any] = {}
        self.refused: list[str] = []
        self.taken: set[str] = set()

    def take(self, name: str) -> Any:
        """The given value of ``name`` (its default when absent), marked as translated."""
        self.taken.add(name)
        return self.given.get(name, self.defaults.get(name))

    def refuse(self, name: str, value: Any, why: str = "") -> None:
        # Masked before the cut: nested secrets (deepspeed={"auth_token": ...}), URL passwords and values of
        # secret environment variables, which reprlib would only shorten.
        shown = reprlib.repr(redact({name: value}, secret_env_values())[name])
        self.refused.append(f"{name}={shown}" + (f" ({why})" if why else ""))

    def translate(self) -> None:
        for theirs, ours in _RENAMED.items():
            self.values[ours] = self.take(theirs)
        self.values["betas"] = (self.take("adam_beta1"), self.take("adam_beta2"))
        # Hugging Face's 0 turns clipping off; ours is null.
        self.values["max_grad_norm"] = self.take("max_grad_norm") or None
        self.values["precision"] = "bf16" if self.take("bf16") else "fp16" if self.take("fp16") else "fp32"
        # transformers 5 renamed gradient_checkpointing activation_checkpointing; both hold the value.
        checkpointing = (self.take("activation_checkpointing"), self.take("gradient_checkpointing"))
        self.values["gradient_checkpointing"] = any(checkpointing)
        # __post_init__ names inductor, torch.compile's default backend, whenever torch_compile is on.
        backend = self.take("torch_compile_backend")
        if backend not in (None, "inductor"):
            self.refuse("torch_compile_backend", backend, "steadyfit compiles with inductor")
        self.values["progress"] = not self.take("disable_tqdm")
        # What steadyfit always does: the whole batch reaches model(**batch) and the labels are
        # batch["labels"]. Saying so is accepted, asking otherwise is not. remove_unused_columns=True, the
        # default, is accepted too: docs/migrating.md says to drop extra columns with remove_columns.
        self.take("remove_unused_columns")
        label_names = self.take("label_names")
        if label_names not in (None, ["labels"]):
            self.refuse("label_names", label_names, 'the targets are batch["labels"]')
        if self.take("use_cpu"):
            self.values["device"] = "cpu"
        if self.take("auto_find_batch_size"):
            self.values["micro_batch_size"] = "auto"
        # None (keep every checkpoint) has no equivalent; keep_last's default then applies.
        keep = self.take("save_total_limit")
        if keep is not None:
            self.values["keep_last"] = keep
        resume = self.take("resume_from_checkpoint")
        if resume is not None:
            self.values["resume"] = resume
        data_seed = self.take("data_seed")
        if data_seed is not None and data_seed != self.values["seed"]:
            self.refuse("data_seed", data_seed, "one seed orders the data: seed")
        self._duration()
        self._warmup()
        self._optimizer()
        self._scheduler()
        self._cadences()
        self._loggers()

    def finish(self) -> dict[str, Any]:
        """The values, or one ConfigError naming every setting that cannot be honoured."""
        for name, value in self.given.items():
            if name in self.taken or name in _IGNORED:
                continue
            if name not in self.defaults:
                self.refuse(name, value, "not a TrainingArguments field of the installed transformers")
            elif value != self.defaults[name]:
                self.refuse(name, value)
        if self.refused:
            raise ConfigError(
                f"TrainConfig.from_hf: steadyfit cannot honour {len(self.refused)} TrainingArguments "
                f"setting(s): {'; '.join(self.refused)}; set them back to their defaults, and ask for what "
                f"steadyfit has with overrides ({MIGRATING_DOC})"
            )
        return self.values

    def _max_steps(self) -> int | None:
        max_steps = self.take("max_steps")
        return max_steps if max_steps and max_steps > 0 else None

    def _duration(self) -> None:
        max_steps = self._max_steps()
        epochs = self.take("num_train_epochs")
        # Hugging Face's max_steps overrides num_train_epochs; ours would stop at whichever comes first.
        if max_steps is not None:
            self.values.update(max_steps=max_steps, max_epochs=None)
        elif float(epochs).is_integer():
            self.values.update(max_steps=None, max_epochs=int(epochs))
        else:
            self.refuse("num_train_epochs", epochs, "steadyfit trains whole epochs: set max_steps instead")

    def _warmup(self) -> None:
        # transformers 5 reads a warmup_steps below 1 as a ratio; older versions have warmup_ratio, which
        # a warmup_steps above 0 overrides.
        steps = self.take("warmup_steps") or 0
        legacy_ratio = self.take("warmup_ratio") or 0.0
        if 0 < steps < 1:
            self.values.update(warmup_steps=0, warmup_ratio=steps)
        else:
            self.values.update(warmup_steps=int(steps), warmup_ratio=0.0 if steps else legacy_ratio)

    def _optimizer(self) -> None:
        optim = self.take("optim")
        if "optimizer" in self.overridden:
            return  # the caller chose; whatever optim says is not translated
        if optim in HF_OPTIMIZERS:
            self.values["optimizer"] = HF_OPTIMIZERS[optim]
        elif optim in HF_OPTIMIZERS_REFUSED:
            self.refuse("optim", optim, HF_OPTIMIZERS_REFUSED[optim])
        else:
            self.refuse("optim", optim, f"steadyfit translates {', '.join(HF_OPTIMIZERS)}")

    def _scheduler(self) -> None:
        name = self.take("lr_scheduler_type")
        kwargs = dict(self.take("lr_scheduler_kwargs") or {})
        if name not in HF_SCHEDULERS:
            self.refuse("lr_scheduler_type", name, f"steadyfit translates {', '.join(HF_SCHEDULERS)}")
            return
        self.values["scheduler"] = HF_SCHEDULERS[name]
        if name == "constant":
            # Hugging Face's constant schedule has no warm-up whatever warmup_steps says.
            self.values.update(warmup_steps=0, warmup_ratio=0.0)
        num_cycles = kwargs.pop("num_cycles", 0.5)
        if num_cycles != 0.5:
            self.refuse(
                "lr_scheduler_kwargs.num_cycles", num_cycles, "steadyfit's cosine is half a wave, 0.5"
            )
        if name == "cosine_with_min_lr" and "min_lr_rate" in kwargs:
            self.values["min_lr_ratio"] = kwargs.pop("min_lr_rate")
        elif name == "cosine_with_min_lr" and "min_lr" in kwargs:
            self.values["min_lr_ratio"] = kwargs.pop("min_lr") / self.values["lr"]
        elif name == "warmup_stable_decay":
            self._wsd(kwargs)
        for key, value in kwargs.items():
            self.refuse(f"lr_scheduler_kwargs.{key}", value, f"not translated for {name}")

    def _wsd(self, kwargs: dict[str, Any]) -> None:
        self.values["min_lr_ratio"] = kwargs.pop("min_lr_ratio", 0.0)
        decay_type = kwargs.pop("decay_type", "cosine")
        if decay_type != "1-sqrt":
            self.refuse(
                "lr_scheduler_kwargs.decay_type",
                decay_type,
                "steadyfit's wsd decays as 1-sqrt: pass decay_type='1-sqrt'",
            )
        warmup_type = kwargs.pop("warmup_type", "linear")
        if warmup_type != "linear":
            self.refuse("lr_scheduler_kwargs.warmup_type", warmup_type, "steadyfit warms up linearly")
        decay_steps = kwargs.pop("num_decay_steps", None)
        max_steps = self._max_steps()
        if decay_steps is None or max_steps is None:
            self.refuse(
                "lr_scheduler_kwargs.num_decay_steps", decay_steps, "decay_ratio needs it and max_steps > 0"
            )
            return
        ratio = decay_steps / max_steps
        # steps_from_ratio rounds up: a quotient a hair above the exact one would add a decay step.
        while ratio > 0 and steps_from_ratio(ratio, max_steps) > decay_steps:
            ratio = math.nextafter(ratio, 0)
        self.values["decay_ratio"] = ratio

    def _cadences(self) -> None:
        logging_steps = self.take("logging_steps")
        self.values["log_every"] = self._cadence(
            "logging_strategy", "logging_steps", logging_steps, {"no": 0, "epoch": "epoch"}
        )
        # transformers 4 spelled eval_strategy evaluation_strategy; an unset eval_steps is logging_steps.
        legacy = self.take("evaluation_strategy")
        eval_steps = self.take("eval_steps") or logging_steps
        self.values["eval_every"] = self._cadence(
            "eval_strategy", "eval_steps", eval_steps, {"no": 0, "epoch": "epoch"}, legacy
        )
        # save_every=0 still keeps the best checkpoints (Hugging Face's "best"); "no" saves the end too.
        self.values["save_every"] = self._cadence(
            "save_strategy", "save_steps", self.take("save_steps"), {"no": 0, "best": 0, "epoch": "epoch"}
        )

    def _cadence(
        self, strategy_name: str, steps_name: str, steps: float, fixed: dict[str, Any], legacy: Any = None
    ) -> Any:
        strategy = self.take(strategy_name) if legacy is None else legacy
        if strategy in fixed:
            return fixed[strategy]
        if strategy != "steps":
            self.refuse(strategy_name, strategy)
            return None
        if steps >= 1:
            return int(steps)
        # A fraction of the run, as the Hugging Face Trainer computes it.
        max_steps = self._max_steps()
        if max_steps is None:
            self.refuse(steps_name, steps, "a fraction of the run needs max_steps > 0")
            return None
        return math.ceil(max_steps * steps)

    def _loggers(self) -> None:
        report_to = self.take("report_to") or []
        if report_to == self.defaults.get("report_to"):
            # transformers 4.x defaults to "all": every integration installed, which nobody asked for.
            report_to = []
        names = [report_to] if isinstance(report_to, str) else list(report_to)
        loggers = [name for name in names if name in _LOGGERS]
        unknown = [name for name in names if name not in (*_LOGGERS, "none")]
        if unknown:
            self.refuse("report_to", unknown, f"steadyfit's loggers: {', '.join(_LOGGERS)}")
        self.values["loggers"] = loggers
