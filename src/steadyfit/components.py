"""Checkpoint components the loop's objects cannot be on their own: adapters with ``state_dict()`` /
``load_state_dict()`` for the model's weights and the optimizer (full, or FSDP shards) and every rank's RNG
streams (the run's fingerprint is ``steadyfit.identity``).

The Trainer lists every component of a run in one mapping (``Trainer._components``); the checkpoint manager
iterates it once to save and once to restore. A ``load_state_dict`` here replaces all of its object's state
or raises: a ``ConfigError`` when the checkpoint belongs to another experiment (the run stops), anything
else when its content is wrong (the checkpoint counts as damaged and the previous one is tried).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from steadyfit.checkpoint.errors import UnstorableValue
from steadyfit.checkpoint.payload import flatten
from steadyfit.checkpoint.sharded import load_shards, split_state
from steadyfit.config import ConfigError
from steadyfit.console import warn
from steadyfit.data import TrainBatches
from steadyfit.distributed import Distributed
from steadyfit.identity import without_compile_prefix
from steadyfit.layout import CONFIG_FILE
from steadyfit.rng import capture_rng, restore_rng

# Optimizers whose per-parameter state tensors all have the parameter's rank, each dimension equal to the
# parameter's or 1 (Adafactor's factored row and column statistics); a loaded state is checked against it.
_PARAMETER_SHAPED_STATE = frozenset({"SGD", "Adam", "AdamW", "Adafactor", "Lamb", "Lion"})


class ModelWeights:
    """The model's full weights (gathered under FSDP) as ``model.safetensors`` holds them.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> weights = ModelWeights(Distributed("none", 0, 0, 1), model)
        >>> weights.load_state_dict(weights.state_dict())
    """

    def __init__(self, dist: Distributed, model: torch.nn.Module) -> None:
        self.dist = dist
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.dist.model_state(self.model)

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load full weights after checking every name and shape against the live model.

        Raises:
            ValueError: names or shapes differ (nothing is loaded).
        """
        live = self.model.state_dict()
        weights = without_compile_prefix(weights, live)  # written from a compiled model's wrapper
        check_same_tensors(weights, live, what="model weights")
        self.dist.load_model_state(self.model, weights)


class ShardedWeights(ModelWeights):
    """Under FSDP: this rank's shards of the model and of the optimizer, written and read through
    torch.distributed.checkpoint (``shards/``); the optimizer's non-tensor state rides in the state file.

    A full checkpoint (one written without FSDP) still loads through :meth:`load_state_dict`.
    """

    # The components whose state the shards hold: the manager neither saves nor loads them on their own.
    covers = ("optimizer",)

    def __init__(self, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(dist, model)
        self.optimizer = optimizer

    def sharded_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's tensors for DCP (no copy) and the state entries that refer to them."""
        tensors, optimizer_structure = split_state(*self.dist.sharded_state(self.model, self.optimizer))
        return tensors, {"optimizer": optimizer_structure}

    def load_shards(self, shards_dir: Path, states: dict[str, Any]) -> None:
        """Every rank loads its slices of a verified sharded checkpoint (resharded on another world size)."""
        structure = states.get("optimizer")
        if structure is None:
            raise ValueError("the state file holds no 'optimizer' structure for the optimizer's shards")
        load_shards(self.dist, shards_dir, self.model, self.optimizer, structure, where="optimizer")

    def load_model_shards(self, shards_dir: Path) -> None:
        """Only the model's slices (the best weights at the end of a run)."""
        load_shards(self.dist, shards_dir, self.model, None, None, where="model")


class OptimizerState:
    """The optimizer's state, full (gathered under FSDP), with the shapes of a loaded state checked."""

    def __init__(self, dist: Distributed, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.dist = dist
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.dist.optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises ValueError (or torch's own errors) for a state that does not fit this optimizer."""
        if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
            raise ValueError("optimizer: the state is not an optimizer state dict (no 'param_groups' list)")
        if not self.dist.is_sharded and type(self.optimizer).__name__ in _PARAMETER_SHAPED_STATE:
            _check_parameter_shaped(self.optimizer, state)
        self.dist.load_optimizer_state(self.model, self.optimizer, state)


def _check_parameter_shaped(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = state.get("state", {})
    if not isinstance(per_param, dict):
        raise ValueError("optimizer: 'state' is not a mapping")
    for index, values in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, dict):
            raise ValueError(f"optimizer: state entry {index!r} names no parameter of this optimizer")
        shape = tuple(params[index].shape)
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            fits = value.dim() == len(shape) and all(
                dim in (size, 1) for dim, size in zip(value.shape, shape, strict=True)
            )
            if not fits:
                raise ValueError(
                    f"optimizer: state[{index}][{key!r}] has shape {tuple(value.shape)}, "
                    f"its parameter {shape}"
                )


class RankRNG:
    """Every rank's RNG streams (python, numpy, torch, CUDA); each rank continues its own after a resume.

    :meth:`state_dict` is a collective under several ranks (the states are gathered to every rank).
    """

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.dist.gather_objects(capture_rng())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Same world size: each rank continues its own streams. A resharded FSDP resume (another world size)
        # continues correctly but not bitwise: there is no saved stream for a new rank.
        restore_rng(_this_ranks(state, self.dist, "rng: no per-rank RNG states"))


class RankDataStreams:
    """Each rank's random streams of training data whose order steadyfit does not own (a user DataLoader,
    an IterableDataset): as its current epoch's loader started, and its DataLoader's own generators (see
    :meth:`steadyfit.data.TrainBatches.state_dict`). A checkpoint without them (written before) resumes with
    the streams of the checkpoint, as it did then.

    :meth:`state_dict` is a collective under several ranks.
    """

    optional_in_checkpoint = True

    def __init__(self, dist: Distributed, batches: TrainBatches) -> None:
        self.dist = dist
        self.batches = batches

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.dist.gather_objects(self.batches.state_dict())}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            self.batches.load_state_dict(None)
            return
        self.batches.load_state_dict(_this_ranks(state, self.dist, "data_streams: no per-rank data streams"))


class CallbackState:
    """A callback's own state, for a callback that defines ``state_dict()`` and ``load_state_dict(state)``
    (as Lightning's do): saved with every checkpoint (rank 0's: every rank's callbacks are given the same
    state back) and restored on resume. Plain data (JSON: numbers, strings, lists, dicts) and tensors.
    Absent from a checkpoint (written before the callback was added), the callback keeps its own state.

    Example:
        >>> from steadyfit import Callback
        >>> class Count(Callback):
        ...     def __init__(self): self.steps = 0
        ...     def state_dict(self): return {"steps": self.steps}
        ...     def load_state_dict(self, state): self.steps = state["steps"]
        >>> CallbackState(Count()).state_dict()
        {'steps': 0}
    """

    optional_in_checkpoint = True

    def __init__(self, callback: Any, warns: bool = True) -> None:
        self.callback = callback
        self._warned = not warns  # one warning, from rank 0

    @staticmethod
    def keeps_state(callback: Any) -> bool:
        """Whether ``callback`` defines both ``state_dict`` and ``load_state_dict``."""
        return callable(getattr(callback, "state_dict", None)) and callable(
            getattr(callback, "load_state_dict", None)
        )

    def state_dict(self) -> Any:
        state = self.callback.state_dict()
        try:
            flatten(state)  # what the checkpoint's own store will do with it, tried first
        except UnstorableValue as exc:
            if not self._warned:  # a Lightning callback's state may hold what torch.save pickles
                self._warned = True
                warn(
                    f"callback {type(self.callback).__name__}: its state_dict() holds a {exc.kind}, which a "
                    "checkpoint stores only as JSON or tensors; its state is not saved, and a resumed run "
                    "starts it afresh"
                )
            return None
        return state

    def load_state_dict(self, state: Any) -> None:
        if state is None:
            return
        try:
            self.callback.load_state_dict(state)
        except Exception as exc:
            # The callback's code, not the checkpoint: no older checkpoint would do better.
            raise ConfigError(
                f"callback {type(self.callback).__name__}: its load_state_dict raised "
                f"{type(exc).__name__}: {exc}; fix it, or leave the callback out to resume"
            ) from exc


def _this_ranks(state: Any, dist: Distributed, missing: str) -> dict[str, Any]:
    """This rank's entry of a ``{"ranks": [...]}`` state gathered from every rank; rank 0's for a rank that
    did not exist when it was saved (another world size).

    Raises:
        ValueError: ``missing``, when the state holds no list of per-rank dicts.
    """
    ranks = state.get("ranks") if isinstance(state, dict) else None
    if not isinstance(ranks, list) or not ranks or not all(isinstance(rank, dict) for rank in ranks):
        raise ValueError(missing)
    return ranks[dist.rank] if dist.rank < len(ranks) else ranks[0]


def check_same_tensors(
    loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, what: str
) -> None:
    """Raise ValueError unless ``loaded`` has exactly ``expected``'s names and shapes.

    Example:
        >>> check_same_tensors({"w": torch.ones(2)}, {"w": torch.zeros(3)}, what="weights")
        Traceback (most recent call last):
        ...
        ValueError: weights: 'w' has shape (2,) in the checkpoint, (3,) here
    """
    if not isinstance(loaded, dict):
        raise ValueError(f"{what}: not a mapping of tensors")
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in loaded.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what}: {name!r} is not a tensor")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{what}: {name!r} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(expected[name].shape)} here"
            )


def upgrade_legacy_states(states: dict[str, Any], extra_files: Mapping[str, bytes]) -> dict[str, Any]:
    """The state entries of a checkpoint written before the components had their own entries (steadyfit
    0.1's first layout, which kept the run's identity and the logging window in ``trainer_state.extra``),
    in today's layout. Checkpoints of today's layout come back unchanged.

    Example:
        >>> upgrade_legacy_states({"trainer_state": {"step": 4, "extra": {}}}, {})["metrics"]
        {'after_step': 4}
    """
    trainer_state = states.get("trainer_state")
    if not isinstance(trainer_state, dict) or "identity" in states:
        return states
    extra = dict(trainer_state.get("extra") or {})
    window = extra.pop("window_stats", None)
    dataset_length = extra.pop("dataset_length", None)
    world_size = extra.pop("world_size", 1)
    saved_config = yaml.safe_load(extra_files.get(CONFIG_FILE, b"")) or {}
    if not isinstance(saved_config, dict):
        raise ValueError(f"{CONFIG_FILE}: not a mapping")
    identity: dict[str, Any] = {
        "world_size": world_size,
        "dataset_length": dataset_length,
        "ema": "ema" in states,
    }
    for key in ("seed", "grad_accum_steps"):
        if key in saved_config:
            identity[key] = saved_config[key]
    if "batch_size" in saved_config:
        identity["global_batch"] = saved_config["batch_size"] * world_size
    upgraded = dict(states)
    upgraded["identity"] = identity
    upgraded["trainer_state"] = {**trainer_state, "extra": extra}
    upgraded.setdefault(
        "window",
        window
        or {
            "loss_sum": 0.0,
            "loss_count": 0.0,
            "run_loss_sum": 0.0,
            "run_loss_count": 0.0,
            "samples": 0,
            "pending_steps": 0,
        },
    )
    upgraded.setdefault("metrics", {"after_step": trainer_state.get("step", 0)})
    return upgraded
