"""The experiment a checkpoint belongs to: its fingerprint, and the one comparison a resume makes.

Every checkpoint records the config fields that shape the trajectory, the model's parameter names, shapes and
dtypes, the optimizer, the data's length and the global batch. ``resume=auto`` continues only a checkpoint
whose fingerprint matches this run; anything else is another experiment, refused before a step is taken
(``ExperimentChanged``, a ``ConfigError``: exit 2), naming every differing field. The fields in
``MAY_CHANGE_ON_RESUME`` are free to change: they say how long to train, what to log and when to save, not
what an update computes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch.utils.data import DataLoader

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.data import dataset_length
from steadyfit.distributed import Distributed

# The fields that change what an update computes (or which samples it sees). ``batch_size`` is compared as
# the global batch (batch_size x world size), so a resharded FSDP run may trade one for the other.
TRAJECTORY_FIELDS = (
    "seed",
    "batch_size",
    "grad_accum_steps",
    "max_grad_norm",
    "clip_value",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "betas",
    "eps",
    "scheduler",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "decay_ratio",
    "step_size",
    "gamma",
    "precision",
    "ema_decay",
    "limit_train_batches",
    "overfit_batches",
)

# The fields a rerun may change and still continue the same experiment: how long, how often, where to
# report, which hardware runs the same arithmetic. docs/checkpoints.md lists them; a test keeps the two
# tuples covering every TrainConfig field, so a new field must be put in one of them.
MAY_CHANGE_ON_RESUME = (
    "run_dir",
    "max_epochs",
    "max_steps",
    "eval_batch_size",
    "eval_every",
    "log_every",
    "save_every",
    "keep_last",
    "metric_for_best",
    "greater_is_better",
    "load_best_at_end",
    "early_stopping_patience",
    "early_stopping_threshold",
    "resume",
    "num_workers",
    "persistent_workers",
    "deterministic",
    "compile",
    "loggers",
    "on_nonfinite",
    "max_consecutive_skips",
    "strategy",
    "fsdp_blocks",
    "device",
    "progress",
    "diagnostics",
    "stop_on",
    "diagnostic_thresholds",
    "keep_best",
    "eval_on_start",
    "fast_dev_run",
    "limit_eval_batches",
    "gradient_checkpointing",
    "micro_batch_size",
)


# What torch.compile's wrapper puts before every weight name. Checkpoints of a model the user compiled,
# written before steadyfit trained the module inside, hold their names with it.
COMPILE_PREFIX = "_orig_mod."


def without_compile_prefix(named: dict[str, Any], live: Any) -> dict[str, Any]:
    """``named`` (weights, shapes or dtypes by name) with the compile prefix dropped when that gives exactly
    the ``live`` names (the model now) and ``named`` are not those already; otherwise ``named`` itself. The
    prefix may follow another (an EMA's ``module.``; its counter ``n_averaged`` keeps its name).

    Example:
        >>> without_compile_prefix({"_orig_mod.weight": 1}, {"weight": 0})
        {'weight': 1}
        >>> without_compile_prefix({"module._orig_mod.w": 1, "n": 2}, {"module.w": 0, "n": 0})
        {'module.w': 1, 'n': 2}
    """
    dropped = {_drop_compile_prefix(name): value for name, value in named.items()}
    if dropped.keys() != named.keys() and dropped.keys() == set(live):
        return dropped
    return named


def _drop_compile_prefix(name: str) -> str:
    """``name`` without its first ``_orig_mod.`` segment (at the start, or after a dot)."""
    if name.startswith(COMPILE_PREFIX):
        return name.removeprefix(COMPILE_PREFIX)
    head, found, tail = name.partition("." + COMPILE_PREFIX)
    return f"{head}.{tail}" if found else name


class ExperimentChanged(ConfigError):
    """The checkpoint belongs to another experiment. ``weights_fit`` says whether this model could still
    start from its weights (``resume=PATH`` fine-tunes then)."""

    def __init__(self, message: str, weights_fit: bool) -> None:
        super().__init__(message)
        self.weights_fit = weights_fit

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses ranks through gather_objects
        return (type(self), (str(self), self.weights_fit))


class RunIdentity:
    """The fingerprint of this run, as a checkpoint component.

    Its ``load_state_dict`` changes nothing: it compares the saved fingerprint with this run's and raises
    ``ExperimentChanged`` naming every difference. Checkpoints written before a field was fingerprinted
    compare on what they hold.

    Example:
        >>> identity = RunIdentity(config, dist, train_ds, model, optimizer, has_ema=False)  # doctest: +SKIP
        >>> identity.load_state_dict(saved)  # doctest: +SKIP
        ExperimentChanged: lr: 0.001 in the checkpoint, 0.05 now
    """

    def __init__(
        self,
        config: TrainConfig,
        dist: Distributed,
        train_data: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        has_ema: bool,
    ) -> None:
        self.config = config
        self.dist = dist
        self.train_data = train_data
        self.model = model
        self.optimizer = optimizer
        self.has_ema = has_ema

    def state_dict(self) -> dict[str, Any]:
        config = self.config
        fields = {name: getattr(config, name) for name in TRAJECTORY_FIELDS if name != "batch_size"}
        model_state = self.model.state_dict()
        return {
            # A JSON round trip, so a tuple compares equal to the list a checkpoint gives back.
            "config": json.loads(json.dumps(fields)),
            "global_batch": config.batch_size * self.dist.world_size,
            "world_size": self.dist.world_size,
            "dataset_length": dataset_length(self.train_data),
            "ema": self.has_ema,
            "parameters": {name: list(t.shape) for name, t in model_state.items()},
            # A model cast to another dtype computes other updates, though the weights still load (cast).
            "dtypes": {name: _dtype_name(t) for name, t in model_state.items()},
            "optimizer": type(self.optimizer).__name__,
            "param_groups": [len(group["params"]) for group in self.optimizer.param_groups],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Raises ExperimentChanged naming every difference; ValueError for a malformed record."""
        if not isinstance(saved, dict):
            raise ValueError("identity: not a mapping")
        now = self.state_dict()
        saved_parameters, saved_dtypes = saved.get("parameters"), saved.get("dtypes")
        if isinstance(saved_parameters, dict):
            saved_parameters = without_compile_prefix(saved_parameters, now["parameters"])
        if isinstance(saved_dtypes, dict):
            saved_dtypes = without_compile_prefix(saved_dtypes, now["dtypes"])
        model_change = _parameter_changes(saved_parameters, now["parameters"])
        changes = self._changes(saved, now)
        recast = "" if model_change else _dtype_changes(saved_dtypes, now["dtypes"])
        if model_change or recast:
            changes.insert(0, f"model: {model_change or recast}")
        if changes:
            raise ExperimentChanged("; ".join(changes), weights_fit=not model_change)

    def _changes(self, saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
        saved_config = saved.get("config")
        if saved_config is not None and not isinstance(saved_config, dict):
            raise ValueError("identity: 'config' is not a mapping")
        # Older checkpoints fingerprinted only the seed and accumulation beside the structure.
        if saved_config is None:
            saved_config = {name: saved[name] for name in ("seed", "grad_accum_steps") if name in saved}
        # Before the fingerprint held the config, a user DataLoader's batch was recorded as the config's
        # default batch_size, which that loader never used: such a global batch says nothing.
        old_loader_record = "config" not in saved and isinstance(self.train_data, DataLoader)
        changes = []
        for name in TRAJECTORY_FIELDS:
            if name == "batch_size":
                if old_loader_record:
                    continue
                if "global_batch" in saved and saved["global_batch"] != now["global_batch"]:
                    changes.append(
                        f"batch_size: global batch (batch_size x world size) {saved['global_batch']} in the "
                        f"checkpoint, {now['global_batch']} now"
                    )
            elif name in saved_config and _differs(saved_config[name], now["config"][name]):
                changes.append(
                    f"{name}: {saved_config[name]!r} in the checkpoint, {now['config'][name]!r} now"
                )
        saved_world = saved.get("world_size", now["world_size"])
        if saved_world != now["world_size"] and not self.dist.is_sharded:
            changes.append(
                f"world size: {saved_world} rank(s) in the checkpoint, {now['world_size']} now (only "
                "strategy=fsdp resumes on another world size, with the same global batch)"
            )
        length = saved.get("dataset_length")
        if length is not None and now["dataset_length"] is not None and length != now["dataset_length"]:
            changes.append(f"train_data: {length} samples in the checkpoint, {now['dataset_length']} now")
        named = {change.partition(":")[0] for change in changes}
        # The EMA and the optimizer's class beyond their config fields (a Trainer may be given its own
        # optimizer): named only when the field did not already say it changed.
        if "ema" in saved and saved["ema"] != now["ema"] and "ema_decay" not in named:
            changes.append(
                "ema_decay: the checkpoint was trained " + ("with" if saved["ema"] else "without") + " EMA"
            )
        for field in ("optimizer", "param_groups"):
            if (
                field in saved
                and saved[field] != now[field]
                and not (field == "optimizer" and field in named)
            ):
                what = field.replace("_", " ")
                changes.append(f"optimizer: {what} {saved[field]!r} in the checkpoint, {now[field]!r} now")
        return changes


def _differs(saved: Any, now: Any) -> bool:
    """Whether a fingerprinted value changed; 1 and 1.0 differ (one batch, or the whole epoch)."""
    return saved != now or type(saved) is not type(now)


def _dtype_name(tensor: Any) -> str:
    """``float32`` for a tensor, or for anything else a state dict may hold (an HF model's extra state)."""
    dtype = getattr(tensor, "dtype", None)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else type(tensor).__name__


def _dtype_changes(saved: Any, now: dict[str, str]) -> str:
    """Which of this model's tensors have another dtype than the saved ones ('' when none; names match)."""
    if saved is None:
        return ""  # a checkpoint from before dtypes were fingerprinted
    if not isinstance(saved, dict):
        raise ValueError("identity: 'dtypes' is not a mapping")
    recast = sorted(name for name in now.keys() & saved.keys() if saved[name] != now[name])
    if not recast:
        return ""
    more = f" and {len(recast) - 5} more" if len(recast) > 5 else ""
    return "other dtypes: " + ", ".join(f"{name} {saved[name]} -> {now[name]}" for name in recast[:5]) + more


def _parameter_changes(saved: Any, now: dict[str, list[int]]) -> str:
    """How this model's parameter names and shapes differ from the saved ones ('' when they match)."""
    if saved is None:
        return ""
    if not isinstance(saved, dict):
        raise ValueError("identity: 'parameters' is not a mapping")
    missing = sorted(now.keys() - saved.keys())
    unexpected = sorted(saved.keys() - now.keys())
    reshaped = sorted(name for name in now.keys() & saved.keys() if list(saved[name]) != now[name])
    parts = []
    if missing:
        parts.append(f"new in this model: {', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"only in the checkpoint: {', '.join(unexpected[:5])}")
    if reshaped:
        parts.append(
            "other shapes: "
            + ", ".join(f"{name} {tuple(saved[name])} -> {tuple(now[name])}" for name in reshaped[:5])
        )
    return ", ".join(parts)
