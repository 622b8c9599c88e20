"""CheckpointStore: atomic, checksummed checkpoints of plain nested state under ``RUN_DIR/checkpoints/``.

A checkpoint directory ``step-<8 digits>/`` holds ``model.safetensors`` (flat name -> tensor, loadable with
plain safetensors), one ``<name>.json`` per component (structure and scalars, see :mod:`.payload`) plus
``<name>.safetensors`` when the component holds tensors, any extra files (e.g. ``config.yaml``), and
``manifest.json`` listing every other file with its size and SHA-256. Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from steadyfit.checkpoint import layout
from steadyfit.checkpoint.atomic import (
    FileRecord,
    commit_dir,
    fsync_path,
    hash_file,
    remove_tree,
    sync_and_hash,
    write_bytes_durable,
)
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import dumps_json, flatten, loads_json, prepare_tensors, unflatten

logger = logging.getLogger(__name__)

_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SHA256_HEX_LEN = 64


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
        try:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            os.mkdir(tmp)
            records: dict[str, FileRecord] = {}
            tensor_files = [(layout.MODEL_FILE, model_tensors)]
            for name, (tensors, structure) in encoded.items():
                json_name, tensors_name = layout.component_files(name)
                if tensors:
                    tensor_files.append((tensors_name, tensors))
                document = {"format_version": layout.FORMAT_VERSION, "state": structure}
                records[json_name] = write_bytes_durable(tmp / json_name, dumps_json(document))
            # Hashing (the read back) of one file overlaps writing the next: hashlib and file I/O release the
            # GIL. Largest first, so the hash left over at the end is the smallest.
            tensor_files.sort(key=lambda item: -_nbytes(item[1]))
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyfit-hash") as hasher:
                pending = {}
                for file_name, tensors in tensor_files:
                    save_file(tensors, tmp / file_name)
                    pending[file_name] = hasher.submit(sync_and_hash, tmp / file_name)
                records.update({file_name: future.result() for file_name, future in pending.items()})
            for name, data in extra_files.items():
                records[name] = write_bytes_durable(tmp / name, bytes(data))
            manifest = {
                "format_version": layout.FORMAT_VERSION,
                "step": step,
                "model": layout.MODEL_FILE,
                "components": list(encoded),
                "extra_files": list(extra_files),
                "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(records.items())},
            }
            # The manifest is written last: a directory with a valid manifest has all its files.
            write_bytes_durable(tmp / layout.MANIFEST_FILE, dumps_json(manifest))
            self._commit(step, tmp, final)
        except (OSError, SafetensorError) as exc:
            _remove_quietly(tmp)
            raise CheckpointError(
                f"could not save checkpoint {final}: {_describe_os_error(exc)}; "
                "earlier checkpoints are untouched"
            ) from exc
        except BaseException:
            _remove_quietly(tmp)
            raise
        return final

    def verify(self, path: str | os.PathLike[str]) -> list[str]:
        """Check a checkpoint directory against its manifest without deserialising anything.

        Returns:
            Human-readable faults; empty when the checkpoint is complete and intact.

        Example:
            >>> import tempfile
            >>> CheckpointStore(tempfile.mkdtemp()).verify("/nonexistent/step-00000001")
            ['/nonexistent/step-00000001 is not a directory']
        """
        faults, _, _ = self._inspect(Path(path), keep=False)
        return faults

    def load(
        self, path: str | os.PathLike[str]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, bytes]]:
        """Verify a checkpoint, then load it: ``(model_state, components, extra_files)``.

        Every file is read once; the bytes are checked against the manifest before any of them is parsed,
        and only what was checked is parsed (safetensors and JSON: no code can run).

        Raises:
            CheckpointError: the checkpoint fails verification or is malformed, naming the path and faults.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> model, components, extra = store.load(store.save(1, {"w": torch.zeros(1)}, {}))
            >>> model
            {'w': tensor([0.])}
        """
        path = Path(path)
        faults, manifest, contents = self._inspect(path, keep=True)
        if faults:
            raise CheckpointError(f"checkpoint {path} failed verification: " + "; ".join(faults))
        assert manifest is not None
        model_state = _parse_tensors(contents[layout.MODEL_FILE], path / layout.MODEL_FILE)
        components = {}
        for name in manifest["components"]:
            json_name, tensors_name = layout.component_files(name)
            where = path / json_name
            document = loads_json(contents[json_name], where=str(where))
            if not isinstance(document, dict) or document.get("format_version") != layout.FORMAT_VERSION:
                raise CheckpointError(f"{where}: unsupported component format (expected format_version 1)")
            tensors = (
                _parse_tensors(contents[tensors_name], path / tensors_name)
                if tensors_name in contents
                else {}
            )
            components[name] = unflatten(document.get("state"), tensors, where=str(where))
        extra_files = {name: contents[name] for name in manifest["extra_files"]}
        return model_state, components, extra_files

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

    def latest_good(self) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
        """The newest checkpoint that verifies, and the damaged ones newer than it with their faults.

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

    def rotate(self, keep_last: int, protect: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
        """Delete committed checkpoints older than the newest ``keep_last``; return what was deleted.

        Never deleted: the newest good checkpoint, any path in ``protect`` (e.g. the best one), any
        checkpoint that fails verification, and anything not named like our checkpoints.

        Example:
            >>> import tempfile
            >>> store = CheckpointStore(tempfile.mkdtemp())
            >>> for step in (1, 2, 3):
            ...     _ = store.save(step, {}, {})
            >>> [p.name for p in store.rotate(keep_last=1, protect=[store.path_for(1)])]
            ['step-00000002']
        """
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        protected = {Path(p).resolve() for p in protect}
        newest_good, _ = self.latest_good()
        if newest_good is not None:
            protected.add(newest_good.resolve())
        deleted = []
        for path in self.list_checkpoints()[:-keep_last]:
            if path.resolve() in protected:
                continue
            faults = self.verify(path)
            if faults:
                logger.warning("not deleting damaged checkpoint %s: %s", path, "; ".join(faults))
                continue
            remove_tree(path)
            deleted.append(path)
        return deleted

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
            if layout.TMP_DIR_RE.match(path.name):
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
        if final.is_symlink() or not final.is_dir():
            raise CheckpointError(f"cannot save checkpoint {final}: a non-directory is in the way; remove it")
        token = secrets.token_hex(4)
        if self.verify(final):
            aside = self.checkpoints_dir / layout.damaged_dir_name(step, token)
            logger.warning("keeping damaged checkpoint %s as %s", final, aside)
            os.rename(final, aside)
            commit_dir(tmp, final)
            return
        aside = self.checkpoints_dir / layout.old_dir_name(step, token)
        os.rename(final, aside)
        commit_dir(tmp, final)
        remove_tree(aside)

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

    def _inspect(
        self, path: Path, *, keep: bool
    ) -> tuple[list[str], dict[str, Any] | None, dict[str, bytes]]:
        """Verify ``path``; with ``keep`` also return the verified bytes of every file."""
        if path.is_symlink():
            return [f"{path} is a symlink (checkpoints are never followed through links)"], None, {}
        if not path.is_dir():
            return [f"{path} is not a directory"], None, {}
        with os.scandir(path) as scan:
            entries = {entry.name: entry for entry in scan}
        manifest_entry = entries.pop(layout.MANIFEST_FILE, None)
        if manifest_entry is None:
            return [f"missing {layout.MANIFEST_FILE} (incomplete or foreign directory)"], None, {}
        manifest_stat = manifest_entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(manifest_stat.st_mode):
            return [f"{layout.MANIFEST_FILE} is not a regular file"], None, {}
        if manifest_stat.st_size > _MAX_MANIFEST_BYTES:
            return [f"{layout.MANIFEST_FILE} is implausibly large ({manifest_stat.st_size} bytes)"], None, {}
        try:
            _, raw = hash_file(path / layout.MANIFEST_FILE, keep=True)
            assert raw is not None
            manifest = loads_json(raw, where=layout.MANIFEST_FILE)
        except (OSError, CheckpointError) as exc:
            return [f"unreadable {layout.MANIFEST_FILE}: {exc}"], None, {}
        faults = _manifest_faults(manifest, path.name)
        if faults:
            return faults, None, {}

        listed: dict[str, dict[str, Any]] = manifest["files"]
        for name in sorted(entries):
            entry = entries[name]
            if entry.is_symlink():
                faults.append(f"symlink {name} (not allowed in a checkpoint)")
            elif not entry.is_file(follow_symlinks=False):
                faults.append(f"unexpected non-file entry {name}")
            elif name not in listed:
                faults.append(f"unexpected file {name} (not in the manifest)")
        contents: dict[str, bytes] = {}
        for name, expected in sorted(listed.items()):
            entry = entries.get(name)
            if entry is None:
                faults.append(f"missing file {name}")
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            if size != expected["size"]:
                faults.append(
                    f"size mismatch for file {name}: manifest says {expected['size']} bytes, found {size}"
                )
                continue
            try:
                record, data = hash_file(path / name, keep=keep)
            except OSError as exc:
                faults.append(f"unreadable file {name}: {_describe_os_error(exc)}")
                continue
            if record.size != expected["size"]:
                faults.append(f"size mismatch for file {name}: changed while reading")
            elif record.sha256 != expected["sha256"]:
                faults.append(f"sha256 mismatch for file {name} (content changed or corrupted)")
            elif data is not None:
                contents[name] = data
        return faults, (manifest if not faults else None), contents


def _manifest_faults(manifest: Any, dir_name: str) -> list[str]:
    """Schema and naming checks on a parsed manifest; roles must account for every listed file."""
    if not isinstance(manifest, dict):
        return [f"malformed {layout.MANIFEST_FILE}: not a JSON object"]
    if manifest.get("format_version") != layout.FORMAT_VERSION:
        return [f"unsupported format_version {manifest.get('format_version')!r} in {layout.MANIFEST_FILE}"]
    files = manifest.get("files")
    components = manifest.get("components")
    extra_files = manifest.get("extra_files")
    step = manifest.get("step")
    if (
        not isinstance(files, dict)
        or not isinstance(components, list)
        or not isinstance(extra_files, list)
        or not _is_int(step)
        or manifest.get("model") != layout.MODEL_FILE
    ):
        return [
            f"malformed {layout.MANIFEST_FILE}: missing or mistyped files/components/extra_files/step/model"
        ]
    faults = []
    for name, entry in files.items():
        if not layout.FILE_NAME_RE.match(name) or name == layout.MANIFEST_FILE:
            faults.append(f"bad name in manifest: {name!r} (must be a plain file name)")
        elif (
            not isinstance(entry, dict)
            or not _is_int(entry.get("size"))
            or entry["size"] < 0
            or not _is_sha256(entry.get("sha256"))
        ):
            faults.append(f"malformed manifest entry for {name!r}")
    if faults:
        return faults
    dir_step = layout.step_of(dir_name)
    if dir_step is not None and dir_step != step:
        faults.append(f"manifest step {step} does not match directory name {dir_name}")
    expected = {layout.MODEL_FILE}
    for name in components:
        if not isinstance(name, str) or not layout.COMPONENT_NAME_RE.match(name):
            faults.append(f"bad component name in manifest: {name!r}")
            continue
        json_name, tensors_name = layout.component_files(name)
        expected.add(json_name)
        if tensors_name in files:
            expected.add(tensors_name)
    for name in extra_files:
        if not isinstance(name, str) or name not in files:
            faults.append(f"extra file {name!r} is not listed in the manifest files")
        else:
            expected.add(name)
    for name in sorted(expected - set(files)):
        faults.append(f"{name} is missing from the manifest files")
    for name in sorted(set(files) - expected):
        faults.append(f"manifest lists {name} but no component or extra file uses it")
    return faults


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _parse_tensors(data: bytes, where: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{where} is not a valid safetensors file: {exc}") from exc


def _describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}"
    return str(exc)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
    except OSError as exc:
        logger.warning("could not remove temporary checkpoint directory %s: %s", path, exc)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == _SHA256_HEX_LEN
        and all(c in "0123456789abcdef" for c in value)
    )
