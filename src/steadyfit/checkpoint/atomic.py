"""Durable file writes, fsync helpers and the atomic rename that commits a checkpoint directory.

The commit protocol: write every file into a temporary sibling directory, fsync each file and then the
directory, rename the directory into place, fsync the parent. A crash before the rename leaves only the
temporary directory (never picked up as a checkpoint); after it, the complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import numpy as np

_CHUNK_BYTES = 4 * 1024 * 1024
# Below this, BLAKE3's thread pool costs more than it saves.
_THREADED_HASH_BYTES = 1024 * 1024

CHECKSUM = "blake3"
"""The algorithm new manifests record; :data:`CHECKSUMS` are the ones verification accepts."""
CHECKSUMS = ("blake3", "sha256")


class _Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class FileRecord:
    """Size and checksum (hex, of ``algorithm``: one of :data:`CHECKSUMS`) of one file, as in a manifest."""

    size: int
    digest: str
    algorithm: str = CHECKSUM


def new_hasher(algorithm: str = CHECKSUM, *, size_hint: int = 0) -> _Hasher:
    """A streaming hasher for ``algorithm``; BLAKE3 hashes on all cores once ``size_hint`` is large.

    Example:
        >>> hasher = new_hasher()
        >>> _ = hasher.update(b"abc")
        >>> hasher.hexdigest()[:8]
        '6437b3ac'
    """
    if algorithm == "blake3":
        threads = blake3.blake3.AUTO if size_hint >= _THREADED_HASH_BYTES else 1
        return blake3.blake3(max_threads=threads)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {', '.join(CHECKSUMS)})")


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
    return write_chunks_durable(path, [data], size=len(data))


def write_chunks_durable(path: Path, chunks: Iterable[Any], *, size: int) -> FileRecord:
    """Create ``path`` (it must not exist) from buffers written in turn, fsync it, and return its record.

    The checksum is taken from the buffers in memory, so the file is never read back; ``size`` (the total,
    known in advance) picks the multi-threaded hash for large files, which then runs while the fsync waits
    on the disk.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> write_chunks_durable(target, [b"ab", memoryview(b"c")], size=3) == write_bytes_durable(
        ...     target.with_name("y.bin"), b"abc"
        ... )
        True
    """
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    hasher = new_hasher(size_hint=size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        for view in views:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        if size < _THREADED_HASH_BYTES:
            for view in views:
                hasher.update(view)
            os.fsync(fd)
        else:
            # The fsync waits on the disk while the hash works on the CPU: overlapped, the hash is nearly
            # free. Both release the GIL. Cost: one short-lived thread per large file.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyfit-fsync") as pool:
                synced = pool.submit(os.fsync, fd)
                for view in views:
                    hasher.update(view)
                synced.result()
    finally:
        os.close(fd)
    written_total = sum(len(view) for view in views)
    return FileRecord(size=written_total, digest=hasher.hexdigest())


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
    """Fsync a file written by someone else (DCP's shard writer) and hash it in the same single read.

    Only for files whose bytes never passed through steadyfit: everything steadyfit writes itself is hashed
    from memory as it is written (:func:`write_bytes_durable`).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> sync_and_hash(target).digest[:8]
        '6437b3ac'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        os.fsync(fd)
        record, _ = _hash_stream(stream, CHECKSUM, keep=False)
    return record


def hash_file(
    path: Path, *, algorithm: str = CHECKSUM, keep: bool = False
) -> tuple[FileRecord, memoryview | None]:
    """Hash a file without following a symlink; with ``keep`` also return its bytes (read exactly once).

    The kept bytes are a writable ``memoryview`` of one buffer, so tensors can be built over them without
    a copy. A large file is hashed chunk by chunk while the next chunk is being read.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> bytes(hash_file(target, keep=True)[1])
        b'abc'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        return _hash_stream(stream, algorithm, keep=keep)


def _hash_stream(stream: Any, algorithm: str, *, keep: bool) -> tuple[FileRecord, memoryview | None]:
    size_hint = os.fstat(stream.fileno()).st_size
    hasher = new_hasher(algorithm, size_hint=size_hint)
    if not keep:
        size = 0
        buffer = bytearray(_CHUNK_BYTES)
        while count := stream.readinto(buffer):
            # Both hashers release the GIL on large buffers, so a background writer does not stall training.
            hasher.update(memoryview(buffer)[:count])
            size += count
        return FileRecord(size=size, digest=hasher.hexdigest(), algorithm=algorithm), None
    # One buffer of the file's size, not zero-filled (every byte kept is read into it), and the tensors
    # are built on it later. A file that changed size since the fstat shows as a size mismatch.
    view = memoryview(np.empty(size_hint, dtype=np.uint8)).cast("B")
    size = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyfit-verify") as pool:
        # The single worker hashes the chunks in order while this thread reads the next ones.
        hashed = []
        while size < size_hint and (count := stream.readinto(view[size : size + _CHUNK_BYTES])):
            hashed.append(pool.submit(hasher.update, view[size : size + count]))
            size += count
        for future in hashed:
            future.result()
    if size == size_hint and stream.read(1):
        size += 1  # grew while being read: reported as a size mismatch, never verified
    record = FileRecord(size=size, digest=hasher.hexdigest(), algorithm=algorithm)
    return record, view[:size]


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
