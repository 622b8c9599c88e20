"""Sharded (FSDP) checkpoints: every rank writes its own slices through torch.distributed.checkpoint (DCP).

Tensors only go through DCP, and only through its safetensors storage (``HuggingFaceStorageWriter`` with
``save_distributed=True``, ``HuggingFaceStorageReader``): each rank writes
``shards/shard-<rank+1>-model-00001-of-00001.safetensors`` with its slices' offsets in the safetensors
header, and the reader rebuilds DCP's metadata from those headers. DCP's default storage would write a
pickled ``.metadata`` file and unpickle it on load; this one never does. The non-tensor optimizer state
(param groups, hyperparameters) is a JSON structure referring to the tensors by key (:mod:`.payload`),
stored with the other components by the coordinator; the manifest covers the shard files too, and is
verified before DCP reads any of them.

The commit protocol of a sharded save: rank 0 creates the temporary directory and broadcasts its name;
every rank writes and fsyncs its shard (a collective ``dcp.save``); the ranks' outcomes are gathered; rank
0 then hashes the shards, writes the components and the manifest, and renames the directory into place (or
removes it if any rank failed); its outcome is broadcast, so every rank returns only after the commit and
all of them raise if it failed.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steadyfit.checkpoint import layout
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import flatten, unflatten
from steadyfit.checkpoint.store import CheckpointStore

if TYPE_CHECKING:
    from steadyfit.distributed import Distributed

MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."


def split_state(
    model_state: Mapping[str, torch.Tensor], optimizer_state: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], Any]:
    """One flat name -> tensor dict for DCP (tensors as they are, DTensor shards included) and the
    optimizer's JSON structure that refers to its tensors.

    Model tensors are keyed ``model.<fqn>``, optimizer tensors ``optimizer.<path>`` (e.g.
    ``optimizer.state.0.weight.exp_avg``); :func:`join_state` inverts it.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> tensors, structure = split_state(model.state_dict(), {"state": {}, "param_groups": [{"lr": 0.1}]})
        >>> sorted(tensors), structure
        (['model.bias', 'model.weight'], {'state': {}, 'param_groups': [{'lr': 0.1}]})
    """
    optimizer_tensors, structure = flatten(dict(optimizer_state), where="optimizer", prepare=False)
    tensors = {MODEL_PREFIX + name: tensor for name, tensor in model_state.items()}
    tensors.update({OPTIMIZER_PREFIX + key: tensor for key, tensor in optimizer_tensors.items()})
    return tensors, structure


def join_state(
    tensors: Mapping[str, torch.Tensor], structure: Any, *, where: str = "optimizer"
) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of :func:`split_state`: ``(model_state, optimizer_state)``.

    Raises:
        CheckpointError: ``structure`` refers to an optimizer tensor missing from ``tensors``, naming
            ``where``.

    Example:
        >>> tensors = {"model.w": torch.ones(1), "optimizer.state.w.step": torch.tensor(2.0)}
        >>> join_state(tensors, {"state": {"w": {"step": {"__tensor__": "state.w.step"}}}})
        ({'w': tensor([1.])}, {'state': {'w': {'step': tensor(2.)}}})
    """
    model_state = {
        name.removeprefix(MODEL_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(MODEL_PREFIX)
    }
    optimizer_tensors = {
        name.removeprefix(OPTIMIZER_PREFIX): tensor
        for name, tensor in tensors.items()
        if name.startswith(OPTIMIZER_PREFIX)
    }
    return model_state, unflatten(structure, optimizer_tensors, where=where)


def write_shards(shards_dir: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """This rank's part of a collective DCP save into ``shards_dir`` (every rank calls it).

    Each rank writes one safetensors file holding its DTensor slices (plain tensors are replicated: DCP
    writes each once) and fsyncs it; nothing else is written (no DCP metadata file, no consolidation).

    Raises:
        CheckpointError: on every rank when any rank failed, naming each failed rank and its error.
    """
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(shards_dir), save_distributed=True)
    with _single_process_is_intended(), _as_checkpoint_error():
        dcp.save(dict(tensors), storage_writer=writer)


def read_shards(shards_dir: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load ``tensors`` in place from ``shards_dir`` (a collective: every rank calls it).

    Each target tensor (a DTensor shard of this rank's layout, or a plain tensor) receives its slices from
    whichever shard files hold them, so the world size may differ from the one that saved (resharding).
    Only safetensors headers and data are read: no pickle.

    Raises:
        CheckpointError: on every rank when any rank failed (e.g. a key missing from the checkpoint),
            naming each failed rank and its error.
    """
    import torch.distributed.checkpoint as dcp

    with _single_process_is_intended(), _as_checkpoint_error():
        dcp.load(dict(tensors), storage_reader=dcp.HuggingFaceStorageReader(str(shards_dir)))


@contextlib.contextmanager
def _as_checkpoint_error() -> Iterator[None]:
    """DCP reports a failure on every rank at once, as a CheckpointException: a BaseException, which
    ``except Exception`` would let through. Ours is a CheckpointError naming each failed rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        reasons = "; ".join(f"rank {rank}: {error}" for rank, (error, _) in sorted(exc.failures.items()))
        raise CheckpointError(reasons) from exc


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Without a process group DCP saves or loads in this process alone, and warns that it assumes so: here
    that is the intent (a one-process save, e.g. in tests), not a forgotten ``init_process_group``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is .*single process", category=UserWarning
        )
        yield


def save_sharded(
    store: CheckpointStore,
    dist: Distributed,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    components: Mapping[str, Any] | None,
    *,
    extra_files: Mapping[str, bytes] | None = None,
    on_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write and commit a sharded checkpoint of ``step``; a collective every rank calls at the same step.

    Args:
        store: the run's checkpoint store.
        dist: the process group (``broadcast_object``, ``gather_objects``, ``rank``, ``is_main``).
        step: the optimizer step naming the checkpoint.
        tensors: this rank's flat tensors (:func:`split_state`).
        components, extra_files: as :meth:`CheckpointStore.commit_sharded`; read on rank 0 only (other
            ranks may pass None).
        on_commit: called on rank 0 with the committed path before the other ranks are released (e.g. to
            rotate); an exception it raises fails the save on every rank.

    Returns:
        The committed checkpoint directory, on every rank.

    Raises:
        CheckpointError: on every rank when any rank failed to write its shard or rank 0 failed to commit;
            nothing is committed then, and earlier checkpoints are untouched.

    Example:
        >>> import tempfile
        >>> from steadyfit.config import TrainConfig
        >>> from steadyfit.distributed import Distributed
        >>> store = CheckpointStore(tempfile.mkdtemp())
        >>> one = Distributed.setup(TrainConfig())  # a single process: DCP runs without a group
        >>> path = save_sharded(store, one, 3, {"model.w": torch.ones(2)}, {"trainer": {"step": 3}})
        >>> sorted(p.name for p in (path / "shards").iterdir())
        ['shard-00001-model-00001-of-00001.safetensors']
    """
    begun: Path | str | None = None
    if dist.is_main:
        try:
            begun = store.begin_sharded(step)
        except CheckpointError as exc:
            begun = str(exc)
    begun = dist.broadcast_object(begun)
    if not isinstance(begun, Path):
        raise CheckpointError(str(begun))
    tmp = begun
    failure = None
    try:
        write_shards(tmp / layout.SHARDS_DIR, tensors)
    except CheckpointError as exc:  # DCP's own report, the same on every rank, naming the failed ranks
        failure = str(exc)
    except Exception as exc:  # reported to rank 0 below, so that it never commits a half checkpoint
        failure = f"rank {dist.rank}: {exc}"
    failures = list(dict.fromkeys(message for message in dist.gather_objects(failure) if message))
    outcome = None
    if dist.is_main:
        outcome = _commit(store, step, tmp, failures, components or {}, extra_files, on_commit)
    committed = dist.broadcast_object(outcome if isinstance(outcome, Path) else str(outcome))
    if isinstance(outcome, CheckpointError):
        raise outcome
    if not isinstance(committed, Path):
        raise CheckpointError(committed)
    return committed


def _commit(
    store: CheckpointStore,
    step: int,
    tmp: Path,
    failures: list[str],
    components: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None,
    on_commit: Callable[[Path], None] | None,
) -> Path | CheckpointError:
    """Rank 0: commit the shards every rank wrote, or discard them; returns the path or what went wrong."""
    final = store.path_for(step)
    if failures:
        store.discard(tmp)
        reasons = "; ".join(failures)
        return CheckpointError(
            f"could not save sharded checkpoint {final}: {reasons}; earlier checkpoints are untouched"
        )
    try:
        path = store.commit_sharded(step, tmp, components, extra_files=extra_files)
        if on_commit is not None:
            on_commit(path)
    except Exception as exc:  # every rank must learn of it, or the others would wait in the next collective
        error = CheckpointError(f"could not save sharded checkpoint {final}: {exc}")
        error.__cause__ = exc
        return error
    return path
