"""Durable file writes, fsync helpers and the atomic rename that commits a checkpoint directory.

The commit protocol: write every file into a temporary sibling directory, fsync each file and then the
directory, rename the directory into place, fsync the parent. A crash before the rename leaves only the
temporary directory (never picked up as a checkpoint); after it, the complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileRecord:
    """Size and SHA-256 (hex) of one file, as listed in a manifest."""

    size: int
    sha256: str


def fsync_path(path: Path) -> None:
    """Flush a file or directory to stable storage.

    Example:
        >>> import tempfile
        >>> fsync_path(Path(tempfile.gettempdir()))
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> FileRecord:
    """Create ``path`` (it must not exist) with ``data``, fsync it, and return its record.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.json"
        >>> write_bytes_durable(target, b"{}").size
        2
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileRecord(size=len(data), sha256=hashlib.sha256(data).hexdigest())


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a torn file.

    Written to a hidden sibling, fsynced, renamed over ``path``, then the directory fsynced.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "config.yaml"
        >>> replace_file(target, b"lr: 0.1\\n"); target.read_bytes()
        b'lr: 0.1\\n'
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash between the write and the rename
    write_bytes_durable(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


def sync_and_hash(path: Path) -> FileRecord:
    """Fsync a file written by someone else (e.g. safetensors) and hash it in the same single read.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> sync_and_hash(target).sha256[:8]
        'ba7816bf'
    """
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(_CHUNK_BYTES)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        os.fsync(fd)
        while count := stream.readinto(buffer):
            # hashlib releases the GIL on large buffers, so a background writer does not stall training.
            digest.update(memoryview(buffer)[:count])
            size += count
    return FileRecord(size=size, sha256=digest.hexdigest())


def hash_file(path: Path, *, keep: bool = False) -> tuple[FileRecord, bytes | None]:
    """Hash a file without following a symlink; with ``keep`` also return its bytes (read exactly once).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> hash_file(target, keep=True)[1]
        b'abc'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        if keep:
            data = stream.readall()
            return FileRecord(size=len(data), sha256=hashlib.sha256(data).hexdigest()), data
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray(_CHUNK_BYTES)
        while count := stream.readinto(buffer):
            digest.update(memoryview(buffer)[:count])
            size += count
    return FileRecord(size=size, sha256=digest.hexdigest()), None


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically rename a fully written ``tmp_dir`` to ``final_dir`` (which must not exist) durably.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / ".tmp").mkdir()
        >>> commit_dir(root / ".tmp", root / "done")
        >>> (root / "done").is_dir()
        True
    """
    fsync_path(tmp_dir)
    os.rename(tmp_dir, final_dir)
    # The rename is durable only once the parent directory's entry is on disk.
    fsync_path(final_dir.parent)


def remove_tree(path: Path) -> None:
    """Delete a directory tree without following symlinks inside it, then fsync its parent."""
    shutil.rmtree(path)
    fsync_path(path.parent)
