"""CheckpointStore: atomic, checksummed checkpoints of plain nested state under ``RUN_DIR/checkpoints/``.

A checkpoint directory ``step-<8 digits>/`` holds ``model.safetensors`` (flat name -> tensor, loadable with
plain safetensors), one ``<name>.json`` per component (structure and scalars, see :mod:`.payload`) plus
``<name>.safetensors`` when the component holds tensors, any extra files (e.g. ``config.yaml``), and
``manifest.json`` listing every other file with its size and checksum (XXH3-128; SHA-256 in checkpoints
written before it, still verified). Nothing is ever unpickled.

A sharded (FSDP) checkpoint holds ``shards/`` instead of ``model.safetensors``: one safetensors file per
rank with its slices of the model and optimizer tensors (see :mod:`.sharded`), listed in the manifest as
``shards/<file>``; the non-tensor optimizer state lives in the components' JSON.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steadyfit import layout
from steadyfit.checkpoint.atomic import (
    FileRecord,
    commit_dir,
    fsync_path,
    remove_tree,
    sync_and_hash,
    write_bytes_durable,
)
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.manifest import build_manifest, describe_os_error, inspect_checkpoint
from steadyfit.checkpoint.payload import (
    dumps_json,
    flatten,
    loads_json,
    prepare_tensors,
    unflatten,
)
from steadyfit.checkpoint.tensor_file import write_tensor_file
from steadyfit.console import warn


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint as :meth:`CheckpointStore.open` returns it.

    Attributes:
        path: the checkpoint directory.
        model_state: the full weights; empty for a sharded checkpoint.
        components: name -> nested state.
        extra_files: file name -> bytes.
        shards_dir: a sharded checkpoint's ``shards/`` directory (model and optimizer tensors, read with
            torch.distributed.checkpoint); None for a full checkpoint.
    """

    path: Path
    model_state: dict[str, torch.Tensor]
    components: dict[str, Any]
    extra_files: dict[str, bytes]
    shards_dir: Path | None


class CheckpointStore:
    """The checkpoints of one run directory: save, verify, load, list, rotate, clean up.

    A save of a step whose committed directory already exists replaces it: a good one is moved aside to
    ``.old-step-…``, the new one renamed into place and the old one deleted; a damaged one is kept as
    ``damaged-step-…`` (a damaged checkpoint is never deleted automatically). A crash between those two
    renames leaves the old checkpoint under its ``.old-`` name, which :meth:`cleanup_stray` moves back.

    Not safe for concurrent writers: hold a :class:`~steadyfit.checkpoint.lock.RunLock` on the run dir.

    Example:
        >>> import tempfile
        >>> store = CheckpointStore(tempfile.mkdtemp())
        >>> path = store.save(100, {"w": torch.ones(2)}, {"trainer": {"epoch": 1}})
        >>> path.name, store.verify(path)
        ('step-00000100', [])
        >>> model, components, extra = store.load(path)
        >>> components["trainer"]["epoch"]
        1
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / layout.CHECKPOINTS_DIR

    def path_for(self, step: int) -> Path:
        """Where the committed checkpoint of ``step`` lives (whether or not it exists)."""
        return self.checkpoints_dir / layout.step_dir_name(step)

    def save(
        self,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        components: Mapping[str, Any],
        *,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> Path:
        """Write a checkpoint atomically and durably; return the committed directory.

        Args:
            step: optimizer step; names the directory ``step-<8 digits>``.
            model_state: flat name -> tensor (a module's ``state_dict()``), written to ``model.safetensors``.
            components: name -> nested state (optimizer, scheduler, scaler, trainer state, RNG...); names
                are letters, digits, ``_`` and ``-``, not ``model`` nor ``manifest``.
            extra_files: plain file name -> bytes, copied verbatim (e.g. ``{"config.yaml": ...}``).

        Returns:
            The committed checkpoint directory.

        Raises:
            CheckpointError: invalid names or unsupported values (nothing written), or a disk error
                (ENOSPC, EACCES, EIO...) naming the path and the cause; earlier checkpoints are intact and
                the temporary directory is removed where possible.
        """
        extra_files = dict(extra_files or {})
        final = self.path_for(step)
        self._check_names(final, components, extra_files)
        # Encode everything before touching the disk: a bad value must not leave a directory behind.
        model_tensors = prepare_tensors(dict(model_state))
        encoded = {name: flatten(state, where=f"components[{name!r}]") for name, state in components.items()}

        tmp = self.checkpoints_dir / layout.tmp_dir_name(step, secrets.token_hex(4))
        with _removed_on_error(tmp, final):
            self._make_tmp(tmp)
            model_file = [(layout.MODEL_FILE, model_tensors)]
            self._write_and_commit(step, tmp, final, {}, model_file, encoded, extra_files)
        return final

    def begin_sharded(self, step: int) -> Path:
        """Create the temporary directory of a sharded save of ``step``; return it (coordinator only).

        Every rank writes its shard into ``<returned>/shards/`` (torch.distributed.checkpoint), then the
        coordinator calls :meth:`commit_sharded`, or :meth:`discard` if any rank failed.

        Raises:
            CheckpointError: a disk error, naming the path and the cause.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> tmp = store.begin_sharded(5)
            >>> (tmp / "shards").is_dir(), store.list_checkpoints()
            (True, [])
        """
        final = self.path_for(step)
        tmp = self.checkpoints_dir / layout.tmp_dir_name(step, secrets.token_hex(4))
        with _removed_on_error(tmp, final):
            self._make_tmp(tmp)
            os.mkdir(tmp / layout.SHARDS_DIR)
        return tmp

    def commit_sharded(
        self,
        step: int,
        tmp: Path,
        components: Mapping[str, Any],
        *,
        shard_records: Mapping[str, FileRecord],
        extra_files: Mapping[str, bytes] | None = None,
    ) -> Path:
        """Seal a sharded save begun with :meth:`begin_sharded` once every rank has written its shard.

        The shard files are not read here: each rank fsynced and hashed its own (:func:`seal_shards`) and
        ``shard_records`` gathers their records. This directory listing of ``shards/`` must hold exactly
        those files with those sizes, or nothing is committed (a listing cached on a shared filesystem
        could miss a shard, and a manifest built from it would verify without it). Then ``shards/`` is
        fsynced, ``components`` (the non-tensor state: JSON plus tensors as in :meth:`save`) and
        ``extra_files`` written, the manifest last, and one atomic rename commits the checkpoint.

        Args:
            step: the step given to :meth:`begin_sharded`.
            tmp: the directory :meth:`begin_sharded` returned.
            components, extra_files: as :meth:`save`.
            shard_records: every rank's :func:`seal_shards` records together (``shards/<file>`` -> record).

        Returns:
            The committed checkpoint directory.

        Raises:
            CheckpointError: invalid names or values, ``shards/`` not holding exactly the recorded files and
                sizes, or a disk error; ``tmp`` is removed and earlier checkpoints are untouched.

        Example:
            >>> import tempfile
            >>> from safetensors.torch import save_file
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> tmp = store.begin_sharded(5)
            >>> name = "shard-00001-model-00001-of-00001.safetensors"
            >>> save_file({"w": torch.ones(2)}, tmp / "shards" / name)
            >>> records = seal_shards(tmp / "shards", [name])
            >>> path = store.commit_sharded(5, tmp, {"trainer": {"epoch": 1}}, shard_records=records)
            >>> store.open(path).shards_dir == path / "shards", store.verify(path)
            (True, [])
        """
        extra_files = dict(extra_files or {})
        final = self.path_for(step)
        with _removed_on_error(tmp, final):
            self._check_names(final, components, extra_files)
            encoded = {
                name: flatten(state, where=f"components[{name!r}]") for name, state in components.items()
            }
            records = _check_shards(tmp, dict(shard_records))
            self._write_and_commit(
                step, tmp, final, records, [], encoded, extra_files, model=layout.SHARDS_DIR
            )
        return final

    def discard(self, tmp: Path) -> None:
        """Remove the temporary directory of a save that will not be committed (e.g. a rank failed)."""
        _remove_quietly(tmp)

    def _make_tmp(self, tmp: Path) -> None:
        if not self.checkpoints_dir.is_dir():
            self.checkpoints_dir.mkdir(parents=True)
            # The new checkpoints/ entry must be durable too, or a crash could lose every checkpoint.
            fsync_path(self.checkpoints_dir.parent)
        os.mkdir(tmp)

    def _write_and_commit(
        self,
        step: int,
        tmp: Path,
        final: Path,
        records: dict[str, FileRecord],
        tensor_files: list[tuple[str, dict[str, torch.Tensor]]],
        encoded: dict[str, tuple[dict[str, torch.Tensor], Any]],
        extra_files: dict[str, bytes],
        *,
        model: str = layout.MODEL_FILE,
    ) -> None:
        """Write the components and extra files next to ``records``' files, the manifest last, and commit."""
        records = dict(records)
        tensor_files = list(tensor_files)
        for name, (tensors, structure) in encoded.items():
            json_name, tensors_name = layout.component_files(name)
            if tensors:
                tensor_files.append((tensors_name, tensors))
            document = {"format_version": layout.FORMAT_VERSION, "state": structure}
            records[json_name] = write_bytes_durable(tmp / json_name, dumps_json(document))
        for file_name, tensors in tensor_files:
            records[file_name] = write_tensor_file(tmp / file_name, tensors)
        for name, data in extra_files.items():
            records[name] = write_bytes_durable(tmp / name, bytes(data))
        manifest = build_manifest(step, list(encoded), list(extra_files), records, model=model)
        # The manifest is written last: a directory with a valid manifest has all its files.
        write_bytes_durable(tmp / layout.MANIFEST_FILE, dumps_json(manifest))
        self._commit(step, tmp, final)

    def verify(self, path: str | os.PathLike[str]) -> list[str]:
        """Check a checkpoint directory against its manifest without deserialising anything.

        Returns:
            Human-readable faults; empty when the checkpoint is complete and intact.

        Example:
            >>> import tempfile
            >>> CheckpointStore(tempfile.mkdtemp()).verify("/nonexistent/step-00000001")
            ['/nonexistent/step-00000001 is not a directory']
        """
        faults, _, _ = inspect_checkpoint(Path(path), keep=False)
        return faults

    def load(
        self, path: str | os.PathLike[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, bytes]]:
        """Verify a full checkpoint, then load it: ``(model_state, components, extra_files)``.

        Every file is read once; the bytes are checked against the manifest before any of them is parsed,
        and only what was checked is parsed (safetensors and JSON: no code can run).

        Raises:
            CheckpointError: the checkpoint fails verification, is malformed, or is sharded (see
                :meth:`open`), naming the path and faults.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> model, components, extra = store.load(store.save(1, {"w": torch.zeros(1)}, {}))
            >>> model
            {'w': tensor([0.])}
        """
        opened = self.open(path)
        if opened.shards_dir is not None:
            raise CheckpointError(
                f"checkpoint {opened.path} is sharded (strategy=fsdp): its tensors load through "
                "torch.distributed.checkpoint; resume it with strategy=fsdp under torchrun"
            )
        return opened.model_state, opened.components, opened.extra_files

    def open(
        self, path: str | os.PathLike[str], *, shard_share: tuple[int, int] = (0, 1)
    ) -> LoadedCheckpoint:
        """Verify a checkpoint, full or sharded, then load everything but a sharded checkpoint's tensors.

        As :meth:`load`; a sharded checkpoint's shard files are verified but not read: every rank loads its
        own slices from ``shards_dir`` with torch.distributed.checkpoint. Under several ranks each rank
        hashes its share of the shard files, ``shard_share=(rank, world_size)`` (every ``world_size``-th file
        in name order from the ``rank``-th: at the world size that saved, the shard it wrote and reads
        back), and checks the others' presence and sizes; the ranks then pool their faults
        (:meth:`~steadyfit.checkpoint.manager.CheckpointManager.restore` does), so each shard is hashed once,
        all of them in parallel.

        Raises:
            CheckpointError: the checkpoint fails verification or is malformed, naming the path and faults.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> opened = store.open(store.save(1, {"w": torch.zeros(1)}, {}))
            >>> opened.model_state, opened.shards_dir
            ({'w': tensor([0.])}, None)
        """
        path = Path(path)
        faults, manifest, contents = inspect_checkpoint(path, keep=True, shard_share=shard_share)
        if faults:
            raise CheckpointError(f"checkpoint {path} failed verification: " + "; ".join(faults))
        assert manifest is not None
        sharded = manifest["model"] == layout.SHARDS_DIR
        model_state = {} if sharded else _tensors(contents[layout.MODEL_FILE])
        components = {}
        for name in manifest["components"]:
            json_name, tensors_name = layout.component_files(name)
            where = path / json_name
            document = loads_json(contents[json_name].numpy().tobytes(), where=str(where))
            if not isinstance(document, dict) or document.get("format_version") != layout.FORMAT_VERSION:
                raise CheckpointError(f"{where}: unsupported component format (expected format_version 1)")
            tensors = _tensors(contents[tensors_name]) if tensors_name in contents else {}
            components[name] = unflatten(document.get("state"), tensors, where=str(where))
        extra_files = {name: contents[name].numpy().tobytes() for name in manifest["extra_files"]}
        shards_dir = path / layout.SHARDS_DIR if sharded else None
        return LoadedCheckpoint(path, model_state, components, extra_files, shards_dir)

    def list_checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, oldest step first.

        Symlinks and names that are not ``step-<digits>`` are ignored (never followed).
        """
        found = []
        if not self.checkpoints_dir.is_dir():
            return []
        with os.scandir(self.checkpoints_dir) as entries:
            for entry in entries:
                step = layout.step_of(entry.name)
                if step is not None and not entry.is_symlink() and entry.is_dir(follow_symlinks=False):
                    found.append((step, Path(entry.path)))
        return [path for _, path in sorted(found)]

    def linked_entries(self) -> list[Path]:
        """Entries named like a checkpoint that are symlinks or not directories (never followed, never
        restored from; a save of their step moves them aside)."""
        if not self.checkpoints_dir.is_dir():
            return []
        with os.scandir(self.checkpoints_dir) as entries:
            return sorted(
                Path(entry.path)
                for entry in entries
                if layout.step_of(entry.name) is not None
                and (entry.is_symlink() or not entry.is_dir(follow_symlinks=False))
            )

    def latest_good(self) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
        """The newest checkpoint that verifies, and the damaged ones newer than it with their faults.

        Verification hashes every file, so this reads each checkpoint it checks (normally just the newest).

        Example:
            >>> import tempfile
            >>> CheckpointStore(tempfile.mkdtemp()).latest_good()
            (None, [])
        """
        damaged = []
        for path in reversed(self.list_checkpoints()):
            faults = self.verify(path)
            if not faults:
                return path, damaged
            damaged.append((path, faults))
        return None, damaged

    def rotate(
        self,
        keep_last: int,
        protect: Iterable[str | os.PathLike[str]] = (),
        *,
        known_good: str | os.PathLike[str] | None = None,
    ) -> list[Path]:
        """Delete committed checkpoints older than the newest ``keep_last``; return what was deleted.

        Never deleted: the newest good checkpoint, any path in ``protect`` (e.g. the best one), any
        checkpoint that fails verification, and anything not named like our checkpoints. Each candidate is
        verified (read in full) before it is deleted.

        Args:
            keep_last: how many of the newest checkpoints to keep (>= 1).
            protect: checkpoints never deleted.
            known_good: a checkpoint the caller knows is intact because it has just committed it: it is not
                read again to find the newest good one (a fresh checkpoint can be as large as the model).
                Checkpoints newer than it, if any, are still verified first.

        Raises:
            ValueError: ``keep_last`` below 1.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> for step in (1, 2, 3):
            ...     newest = store.save(step, {}, {})
            >>> [p.name for p in store.rotate(keep_last=1, protect=[store.path_for(1)], known_good=newest)]
            ['step-00000002']
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        protected = {Path(p).resolve() for p in protect}
        newest_good = self._newest_good(Path(known_good).resolve() if known_good is not None else None)
        if newest_good is not None:
            protected.add(newest_good.resolve())
        deleted = []
        for path in self.list_checkpoints()[:-keep_last]:
            if path.resolve() in protected:
                continue
            faults = self.verify(path)
            if faults:
                warn(f"not deleting damaged checkpoint {path}: {'; '.join(faults)}")
                continue
            # Out of sight first (one rename): a crash while deleting leaves a hidden directory that
            # cleanup_stray() removes, never a step- directory missing some of its files.
            doomed = self.checkpoints_dir / layout.deleting_dir_name(path.name, secrets.token_hex(4))
            os.rename(path, doomed)
            remove_tree(doomed)
            deleted.append(path)
        return deleted

    def _newest_good(self, known_good: Path | None) -> Path | None:
        """As :meth:`latest_good`, taking ``known_good`` (resolved) as intact without reading it."""
        for path in reversed(self.list_checkpoints()):
            if path.resolve() == known_good or not self.verify(path):
                return path
        return None

    def cleanup_stray(self) -> list[Path]:
        """Remove temporary directories left by a crashed save; return what was removed.

        Only names matching our temporary pattern are touched, and never symlinks. A checkpoint moved aside
        by an interrupted replacement (``.old-step-…``) is renamed back when its step directory is missing,
        and removed when the replacement was committed. Call it before saving, not while a save is running.
        """
        removed: list[Path] = []
        if not self.checkpoints_dir.is_dir():
            return removed
        with os.scandir(self.checkpoints_dir) as entries:
            strays = [Path(e.path) for e in entries if not e.is_symlink() and e.is_dir(follow_symlinks=False)]
        for path in sorted(strays):
            if layout.TMP_DIR_RE.match(path.name) or layout.DELETING_DIR_RE.match(path.name):
                remove_tree(path)
                removed.append(path)
                continue
            old = layout.OLD_DIR_RE.match(path.name)
            if old:
                final = self.path_for(int(old.group(1)))
                if final.exists() or final.is_symlink():
                    remove_tree(path)
                    removed.append(path)
                else:
                    os.rename(path, final)
                    fsync_path(final.parent)
        return removed

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        if not (final.exists() or final.is_symlink()):
            commit_dir(tmp, final)
            return
        token = secrets.token_hex(4)
        if final.is_symlink() or not final.is_dir():
            # Not ours (a link, a file): kept under a damaged- name, never followed nor deleted.
            aside = self.checkpoints_dir / layout.damaged_dir_name(step, token)
            warn(f"moving {final} (not a checkpoint directory) aside as {aside}")
            os.rename(final, aside)
            commit_dir(tmp, final)
            return
        damaged = bool(self.verify(final))
        if damaged:
            aside = self.checkpoints_dir / layout.damaged_dir_name(step, token)
            warn(f"keeping damaged checkpoint {final} as {aside}")
        else:
            aside = self.checkpoints_dir / layout.old_dir_name(step, token)
        os.rename(final, aside)
        try:
            commit_dir(tmp, final)
        except BaseException:
            if not final.exists():
                os.rename(aside, final)
            raise
        if not damaged:
            try:
                remove_tree(aside)
            except OSError as exc:
                # The new checkpoint is committed; cleanup_stray() removes the leftover on the next start.
                warn(f"could not remove replaced checkpoint {aside}: {exc}")

    def _check_names(
        self, final: Path, components: Mapping[str, Any], extra_files: Mapping[str, bytes]
    ) -> None:
        reserved = {layout.MODEL_FILE, layout.MANIFEST_FILE}
        for name in components:
            if (
                not isinstance(name, str)
                or not layout.COMPONENT_NAME_RE.match(name)
                or name in layout.RESERVED_COMPONENT_NAMES
            ):
                raise CheckpointError(
                    f"cannot save {final}: component name {name!r} must be letters, digits, '_' or '-' "
                    "and not 'model' or 'manifest'"
                )
            reserved.update(layout.component_files(name))
        for name, data in extra_files.items():
            if not isinstance(name, str) or not layout.FILE_NAME_RE.match(name) or name in reserved:
                raise CheckpointError(
                    f"cannot save {final}: extra file name {name!r} must be a plain file name (no '/', no "
                    f"leading '.') that is not one of {sorted(reserved)}"
                )
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise CheckpointError(f"cannot save {final}: extra file {name!r} must be bytes")


def seal_shards(shards_dir: Path, names: Iterable[str]) -> dict[str, FileRecord]:
    """Fsync and hash the shard files this rank wrote (file names in ``shards_dir``), then the directory.

    Every rank seals its own shards right after writing them, so the hashing is spread over the ranks and
    the coordinator never reads another rank's shard to commit (:meth:`CheckpointStore.commit_sharded`).

    Returns:
        ``shards/<file>`` -> record, as the manifest lists them; empty when the rank wrote nothing (DCP
        writes no file for a rank whose save plan is empty).

    Raises:
        CheckpointError: a name that is not a shard file name.
        OSError: a file cannot be read or synced.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> shards = Path(tempfile.mkdtemp())
        >>> save_file({"w": torch.ones(2)}, shards / "shard-00001-model-00001-of-00001.safetensors")
        >>> list(seal_shards(shards, ["shard-00001-model-00001-of-00001.safetensors"]))
        ['shards/shard-00001-model-00001-of-00001.safetensors']
    """
    records = {}
    for name in sorted(names):
        entry = layout.shard_entry(name)
        if layout.shard_file_of(entry) is None:
            raise CheckpointError(
                f"{shards_dir / name}: not a shard file name (a shard is a *{layout.SHARD_SUFFIX} file)"
            )
        records[entry] = sync_and_hash(shards_dir / name)
    if records:
        # This rank created entries in shards/: their names must be durable before the commit too.
        fsync_path(shards_dir)
    return records


def _check_shards(tmp: Path, records: dict[str, FileRecord]) -> dict[str, FileRecord]:
    """The coordinator's listing of ``tmp/shards`` must hold exactly the files the ranks recorded, at the
    recorded sizes (a stat each, no read); returns ``records`` once ``shards/`` is fsynced."""
    shards_dir = tmp / layout.SHARDS_DIR
    with os.scandir(shards_dir) as entries:
        listed = {layout.shard_entry(entry.name): entry for entry in entries}
    faults = []
    for entry in sorted(listed.keys() - records.keys()):
        faults.append(f"unexpected entry {entry} (no rank wrote it)")
    for entry in sorted(records.keys() - listed.keys()):
        faults.append(
            f"{entry} was written by a rank but is missing from this listing of {layout.SHARDS_DIR}/ (a "
            "stale listing on a shared filesystem?)"
        )
    for entry in sorted(records.keys() & listed.keys()):
        found = listed[entry]
        if found.is_symlink() or not found.is_file(follow_symlinks=False):
            faults.append(f"unexpected entry {entry} (not a regular file)")
            continue
        size = found.stat(follow_symlinks=False).st_size
        if size != records[entry].size:
            faults.append(f"{entry} is {size} bytes here but its rank wrote {records[entry].size} bytes")
    if not records and not faults:
        faults.append("no rank wrote a shard file")
    if faults:
        raise CheckpointError(f"cannot commit {tmp}: " + "; ".join(faults))
    fsync_path(shards_dir)
    return records


def _tensors(read: dict[str, torch.Tensor] | CheckpointError) -> dict[str, torch.Tensor]:
    """A verified tensors file's tensors, or the error that says why its verified bytes are not valid."""
    if isinstance(read, CheckpointError):
        raise read
    return read


@contextlib.contextmanager
def _removed_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """Remove the temporary directory of a save that fails; disk errors become a CheckpointError."""
    try:
        yield
    except OSError as exc:
        _remove_quietly(tmp)
        raise CheckpointError(
            f"could not save checkpoint {final}: {describe_os_error(exc)}; earlier checkpoints are untouched"
        ) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
    except OSError as exc:
        warn(f"could not remove temporary checkpoint directory {path}: {exc}")
