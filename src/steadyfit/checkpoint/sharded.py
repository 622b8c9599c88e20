"""Sharded (FSDP) checkpoints: every rank writes its own slices through torch.distributed.checkpoint (DCP).

Tensors only go through DCP, and only through its safetensors storage (``HuggingFaceStorageWriter`` with
``save_distributed=True``, ``HuggingFaceStorageReader``): rank ``r`` writes
``shards/shard-<r+1 as 5 digits>-model-00001-of-00001.safetensors`` (``shard-00001-…`` for rank 0; no
file when it holds nothing to write) with its slices' offsets in the safetensors header, and the reader
rebuilds DCP's metadata from those headers. DCP's default storage would write a pickled ``.metadata``
file and unpickle it on load; this one never does. The non-tensor optimizer state
(param groups, hyperparameters) is a JSON structure referring to the tensors by key (:mod:`.payload`),
stored with the other components by the coordinator; the manifest covers the shard files too, and is
verified before DCP reads any of them.

The commit protocol of a sharded save: rank 0 creates the temporary directory and broadcasts its name;
every rank writes its shard (a collective ``dcp.save``), then fsyncs and hashes the file it wrote itself;
the ranks' outcomes and file records are gathered; rank 0 checks that its listing of ``shards/`` holds
exactly the recorded files and sizes (it reads no other rank's shard), writes the components and the
manifest from the gathered records, and renames the directory into place (or removes it if any rank
failed or the listing disagrees); its outcome is broadcast, so every rank returns only after the commit
and all of them raise if it failed. Rotation after the commit is best effort: the checkpoint is committed
whether or not it succeeds.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steadyfit import layout
from steadyfit.checkpoint.atomic import FileRecord
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.manifest import describe_os_error
from steadyfit.checkpoint.payload import flatten, tensor_keys, unflatten
from steadyfit.checkpoint.store import CheckpointStore, seal_shards
from steadyfit.console import warn

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


def write_shards(shards_dir: Path, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """This rank's part of a collective DCP save into ``shards_dir`` (every rank calls it).

    Each rank writes one safetensors file holding its DTensor slices (plain tensors are replicated: DCP
    writes each once), or none when it holds nothing to write; nothing else is written (no DCP metadata
    file, no consolidation).

    Returns:
        The names of the files this rank wrote in ``shards_dir`` (one, or none).

    Raises:
        CheckpointError: on every rank when any rank failed, naming each failed rank and its error.

    Example:
        >>> import tempfile
        >>> write_shards(Path(tempfile.mkdtemp()), {"model.w": torch.ones(2)})
        ['shard-00001-model-00001-of-00001.safetensors']
    """
    import torch.distributed.checkpoint as dcp

    # The writer is built inside the guards too, so that whatever it raises takes the same way out.
    with _single_process_is_intended(), _as_checkpoint_error():
        from steadyfit.checkpoint.shard_writer import ShardWriter

        writer = ShardWriter(shards_dir)
        dcp.save(dict(tensors), storage_writer=writer)
    return writer.written_files()


def load_shards(
    dist: Distributed,
    shards_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_structure: Any = None,
    *,
    where: str = "optimizer",
) -> None:
    """Load a verified sharded checkpoint into ``model`` (and ``optimizer``); a collective every rank calls.

    The targets come from the live model and optimizer, laid out for this world size (resharding when it
    differs from the saved one); DCP fills them in place from whichever shard files hold each slice. The
    optimizer's targets are only those ``optimizer_structure`` (the saved JSON structure) refers to: a
    fresh optimizer gets state for every parameter, but the saved one has none for a parameter that never
    had a gradient (an unused branch), and asking DCP for it would fail the load. The optimizer state is
    then set from the saved structure, so such a parameter has no state after the resume either.

    Args:
        dist: the process group (:meth:`~steadyfit.distributed.Distributed.sharded_state`).
        shards_dir: the checkpoint's ``shards/`` directory, verified against the manifest.
        model, optimizer: the live objects; without ``optimizer`` only the model is loaded.
        optimizer_structure: the saved optimizer structure (:func:`split_state`); needed with ``optimizer``.
        where: how errors name the structure's origin.

    Raises:
        CheckpointError: on every rank when any rank failed to load (e.g. a model key missing from the
            checkpoint), or the structure refers to a tensor that was not loaded.

    Example:
        >>> import tempfile
        >>> from steadyfit.config import TrainConfig
        >>> from steadyfit.distributed import Distributed
        >>> one = Distributed.setup(TrainConfig())
        >>> saved, fresh = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> shards = Path(tempfile.mkdtemp())
        >>> _ = write_shards(shards, split_state(saved.state_dict(), {})[0])
        >>> load_shards(one, shards, fresh)
        >>> torch.equal(fresh.weight, saved.weight)
        True
    """
    model_state, optimizer_state = dist.sharded_state(model, optimizer)
    tensors, _ = split_state(model_state, optimizer_state)
    wanted = {OPTIMIZER_PREFIX + key for key in tensor_keys(optimizer_structure)}
    targets = {name: t for name, t in tensors.items() if name.startswith(MODEL_PREFIX) or name in wanted}
    read_shards(shards_dir, targets)
    model_state, optimizer_state = join_state(targets, optimizer_structure or {}, where=where)
    dist.load_sharded_state(model, model_state, optimizer, optimizer_state)


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
            rotate); an exception it raises is logged as a warning and the save still succeeds on every
            rank: the checkpoint is committed.

    Returns:
        The committed checkpoint directory, on every rank.

    Raises:
        CheckpointError: on every rank when any rank failed to write or seal its shard, rank 0's listing
            of ``shards/`` disagrees with the files the ranks wrote, or rank 0 failed to commit; nothing is
            committed then, and earlier checkpoints are untouched.

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
    records: dict[str, FileRecord] = {}
    try:
        written = write_shards(tmp / layout.SHARDS_DIR, tensors)
    except CheckpointError as exc:  # DCP's own report, the same on every rank, naming the failed ranks
        failure = str(exc)
    except Exception as exc:  # reported to rank 0 below, so that it never commits a half checkpoint
        failure = f"rank {dist.rank}: {exc}"
    else:
        # Each rank seals its own file: the hashing runs in parallel, and rank 0 never reads another
        # rank's shard (serially, while the others wait in the collective below under its timeout).
        try:
            records = seal_shards(tmp / layout.SHARDS_DIR, written)
        except Exception as exc:
            failure = f"rank {dist.rank}: could not seal its shard: {describe_os_error(exc)}"
    gathered = dist.gather_objects((failure, records))
    failures = list(dict.fromkeys(message for message, _ in gathered if message))
    outcome = None
    if dist.is_main:
        records_by_rank = [rank_records for _, rank_records in gathered]
        outcome = _commit(
            store, step, tmp, failures, records_by_rank, components or {}, extra_files, on_commit
        )
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
    records_by_rank: list[dict[str, FileRecord]],
    components: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None,
    on_commit: Callable[[Path], None] | None,
) -> Path | CheckpointError:
    """Rank 0: commit the shards every rank wrote and sealed, or discard them; returns the path or what went
    wrong."""
    final = store.path_for(step)
    shard_records: dict[str, FileRecord] = {}
    for rank, records in enumerate(records_by_rank):
        for entry in records.keys() & shard_records.keys():
            failures.append(f"rank {rank}: {entry} was also written by another rank")
        shard_records.update(records)
    if failures:
        store.discard(tmp)
        reasons = "; ".join(failures)
        return CheckpointError(
            f"could not save sharded checkpoint {final}: {reasons}; earlier checkpoints are untouched"
        )
    try:
        path = store.commit_sharded(
            step, tmp, components, shard_records=shard_records, extra_files=extra_files
        )
    except Exception as exc:  # every rank must learn of it, or the others would wait in the next collective
        error = CheckpointError(f"could not save sharded checkpoint {final}: {exc}")
        error.__cause__ = exc
        return error
    if on_commit is not None:
        try:
            on_commit(path)
        except Exception as exc:  # committed already: failing the save now would misreport it as lost
            warn(f"checkpoint {path} is committed, but what followed its commit failed: {exc}")
    return path
