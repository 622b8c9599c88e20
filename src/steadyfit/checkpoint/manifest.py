"""The manifest: building it, and verifying a checkpoint directory against it before anything read is used."""

from __future__ import annotations

import errno
import functools
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steadyfit import layout
from steadyfit.checkpoint.atomic import CHECKSUMS, DIGEST_HEX_DIGITS, FileRecord, hash_file
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import loads_json
from steadyfit.checkpoint.tensor_file import read_tensor_file

_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def build_manifest(
    step: int,
    components: Sequence[str],
    extra_files: Sequence[str],
    records: Mapping[str, FileRecord],
    *,
    model: str = layout.MODEL_FILE,
) -> dict[str, Any]:
    """The manifest of a checkpoint whose files (all but the manifest itself) have these records.

    ``model`` is ``model.safetensors`` for a full checkpoint, or ``shards`` for a sharded one, whose shard
    files are listed as ``shards/<file>``. Each file's entry names its checksum's algorithm by its key:
    ``{"size": N, "xxh3_128": "<hex>"}`` (manifests written before XXH3 hold ``"sha256"``).

    Example:
        >>> files = build_manifest(7, [], [], {"model.safetensors": FileRecord(8, "0" * 32)})["files"]
        >>> sorted(files["model.safetensors"])
        ['size', 'xxh3_128']
    """
    return {
        "format_version": layout.FORMAT_VERSION,
        "step": step,
        "model": model,
        "components": list(components),
        "extra_files": list(extra_files),
        "files": {name: {"size": r.size, r.algorithm: r.digest} for name, r in sorted(records.items())},
    }


def inspect_checkpoint(
    path: Path, *, keep: bool, shard_share: tuple[int, int] = (0, 1)
) -> tuple[list[str], dict[str, Any] | None, dict[str, Any]]:
    """Verify a checkpoint directory against its manifest; with ``keep`` also return what the verified
    files hold.

    Only the manifest (JSON) is parsed before its files are verified, and, with ``keep``, the headers of
    the tensor files, which say where their tensors' bytes go (strict JSON; nothing read from a file is
    returned unless its digest matches). Files are opened with ``O_NOFOLLOW`` and each one's size is
    checked before it is read, so a planted huge or linked file is never read. A sharded checkpoint's
    ``shards/`` directory is checked like the top level (no symlinks, no deeper entries, nothing unlisted).

    Args:
        path: the checkpoint directory.
        keep: also return the top-level files: the tensor files (the weights, each component's tensors)
            as :func:`~steadyfit.checkpoint.tensor_file.read_tensor_file` reads them (their tensors by name,
            or the error that says why the verified bytes are not valid safetensors), every other file as
            its bytes (one uint8 tensor). Shard files are hashed, never kept: they are read later, slice by
            slice, by torch.distributed.checkpoint.
        shard_share: ``(index, count)``: hash only every ``count``-th shard file in name order from the
            ``index``-th (one rank's share: ``(rank, world_size)``); the others' presence and sizes are still
            checked. The default hashes them all.

    Returns:
        ``(faults, manifest, contents)``: ``manifest`` is None unless ``faults`` is empty; ``contents`` maps
        each top-level file name to what it holds when ``keep``. Only this call's share of the shard files is
        covered by ``faults``.

    Example:
        >>> inspect_checkpoint(Path("/nonexistent"), keep=False)[0]
        ['/nonexistent is not a directory']
    """
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
        fd = os.open(path / layout.MANIFEST_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as stream:
            raw = stream.read(_MAX_MANIFEST_BYTES)  # bounded: it may have grown since the stat
        manifest = loads_json(raw, where=layout.MANIFEST_FILE)
    except (OSError, CheckpointError) as exc:
        return [f"unreadable {layout.MANIFEST_FILE}: {exc}"], None, {}
    faults = manifest_faults(manifest, path.name)
    if faults:
        return faults, None, {}

    listed: dict[str, dict[str, Any]] = manifest["files"]
    if manifest["model"] == layout.SHARDS_DIR:
        shards_entry = entries.pop(layout.SHARDS_DIR, None)
        if shards_entry is None:
            faults.append(f"missing directory {layout.SHARDS_DIR}")
        elif shards_entry.is_symlink() or not shards_entry.is_dir(follow_symlinks=False):
            faults.append(
                f"{layout.SHARDS_DIR} is not a directory (symlinks are not allowed in a checkpoint)"
            )
        else:
            with os.scandir(path / layout.SHARDS_DIR) as scan:
                entries.update({layout.shard_entry(entry.name): entry for entry in scan})
    for name in sorted(entries):
        entry = entries[name]
        if entry.is_symlink():
            faults.append(f"symlink {name} (not allowed in a checkpoint)")
        elif not entry.is_file(follow_symlinks=False):
            faults.append(f"unexpected non-file entry {name}")
        elif name not in listed:
            faults.append(f"unexpected file {name} (not in the manifest)")
    contents: dict[str, Any] = {}
    # Kept tensor files are read straight into their tensors (see read_tensor_file).
    tensor_files = _tensor_files(manifest) if keep else set()
    index, count = shard_share
    shard_names = sorted(name for name in listed if layout.shard_file_of(name) is not None)
    shares = {name: position % count == index for position, name in enumerate(shard_names)}
    for name, expected in sorted(listed.items()):
        is_shard = layout.shard_file_of(name) is not None
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
        if is_shard and not shares[name]:
            continue
        checksum = checksum_of(expected)
        assert checksum is not None  # manifest_faults checked every entry
        algorithm = checksum[0]
        read = None
        if name in tensor_files:
            read = functools.partial(read_tensor_file, size=expected["size"], where=path / name)
        try:
            record, data = hash_file(
                path / name,
                algorithm=algorithm,
                keep=keep and not is_shard,
                size=expected["size"],
                read=read,
            )
        except OSError as exc:
            faults.append(f"unreadable file {name}: {describe_os_error(exc)}")
            continue
        if record.size != expected["size"]:
            faults.append(f"size mismatch for file {name}: changed while reading")
        elif record.digest != expected[algorithm]:
            faults.append(f"{algorithm} mismatch for file {name} (content changed or corrupted)")
        elif data is not None:
            contents[name] = data
    return faults, (manifest if not faults else None), contents


def manifest_faults(manifest: Any, dir_name: str) -> list[str]:
    """Schema and naming checks on a parsed manifest; the roles must account for every listed file.

    Example:
        >>> manifest_faults({"format_version": 0}, "step-00000001")
        ['unsupported format_version 0 in manifest.json']
    """
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
        or manifest.get("model") not in (layout.MODEL_FILE, layout.SHARDS_DIR)
    ):
        return [
            f"malformed {layout.MANIFEST_FILE}: missing or mistyped files/components/extra_files/step/model"
        ]
    sharded = manifest["model"] == layout.SHARDS_DIR
    shards = {name for name in files if sharded and layout.shard_file_of(name) is not None}
    faults = []
    for name, entry in files.items():
        if name not in shards and (not layout.FILE_NAME_RE.match(name) or name == layout.MANIFEST_FILE):
            faults.append(f"bad name in manifest: {name!r} (must be a plain file name)")
        elif (
            not isinstance(entry, dict)
            or not _is_int(entry.get("size"))
            or entry["size"] < 0
            or checksum_of(entry) is None
        ):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            faults.append(
                f"malformed manifest entry for {name!r}: {keys} (expected a size and one checksum: "
                f"{' or '.join(CHECKSUMS)} with a lowercase hex digest; a checkpoint of another steadyfit "
                "version?)"
            )
    if faults:
        return faults
    dir_step = layout.step_of(dir_name)
    if dir_step is not None and dir_step != step:
        faults.append(f"manifest step {step} does not match directory name {dir_name}")
    if sharded and not shards:
        faults.append(f"a sharded checkpoint's manifest lists no {layout.SHARDS_DIR}/*.safetensors file")
    expected = shards if sharded else {layout.MODEL_FILE}
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


def describe_os_error(exc: BaseException) -> str:
    """``ENOSPC: No space left on device (path)`` for an OSError, ``str(exc)`` for anything else."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{name}: {exc.strerror}{where}"
    return str(exc)


def _tensor_files(manifest: Mapping[str, Any]) -> set[str]:
    """The safetensors files a verified manifest's loader parses: the weights (unless sharded) and each
    component's tensors (listed only when the component has any)."""
    names = {layout.component_files(name)[1] for name in manifest["components"]}
    if manifest["model"] != layout.SHARDS_DIR:
        names.add(layout.MODEL_FILE)
    return names & manifest["files"].keys()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checksum_of(entry: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, hex digest)`` of a manifest file entry, or None unless it holds its size and exactly one
    known checksum, and nothing else.

    Example:
        >>> checksum_of({"size": 3, "sha256": "ab" * 32})[0], checksum_of({"size": 3})
        ('sha256', None)
    """
    named = [(algorithm, entry[algorithm]) for algorithm in CHECKSUMS if algorithm in entry]
    if len(named) != 1 or set(entry) != {"size", named[0][0]} or not _is_digest(*named[0]):
        return None
    return named[0]


def _is_digest(algorithm: str, value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == DIGEST_HEX_DIGITS[algorithm]
        and all(c in "0123456789abcdef" for c in value)
    )
