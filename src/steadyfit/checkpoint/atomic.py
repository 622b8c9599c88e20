"""Durable file writes, checksums, fsync helpers and the atomic rename that commits a checkpoint directory.

The commit protocol: write every file into a temporary sibling directory, fsync each file and then the
directory, rename the directory into place, fsync the parent. A crash before the rename leaves only the
temporary directory (never picked up as a checkpoint); after it, the complete checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import torch
import xxhash

_CHUNK_BYTES = 8 * 1024 * 1024
# Below this a file is hashed in the caller's thread: starting a thread costs more than it overlaps.
_THREADED_HASH_BYTES = 1024 * 1024
# Buffers in flight when a file is hashed without keeping its bytes: one being read, two being hashed.
_READ_BUFFERS = 3

CHECKSUM = "xxh3_128"
"""The algorithm new manifests record (XXH3, 128 bits: a checksum against damage, hashed at memory speed);
:data:`CHECKSUMS` are the ones verification accepts."""
CHECKSUMS = ("xxh3_128", "sha256")
DIGEST_HEX_DIGITS = {"xxh3_128": 32, "sha256": 64}


class _Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class FileRecord:
    """Size and checksum (hex, of ``algorithm``: one of :data:`CHECKSUMS`) of one file, as in a manifest."""

    size: int
    digest: str
    algorithm: str = CHECKSUM


def new_hasher(algorithm: str = CHECKSUM) -> _Hasher:
    """A single-threaded streaming hasher for ``algorithm``.

    Hashing overlaps I/O in a thread that steadyfit joins (:class:`HashThread`), never in a pool that
    outlives the call.

    Example:
        >>> hasher = new_hasher()
        >>> _ = hasher.update(b"abc")
        >>> hasher.hexdigest()[:8]
        '06b05ab6'
    """
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: {', '.join(CHECKSUMS)})")


class HashThread:
    """Hashes the buffers given to :meth:`update`, in order, in a thread of its own while the caller does
    I/O on them; a context manager that always joins its thread.

    Both hashers release the GIL on large buffers, as do file reads and writes, so the hash runs beside the
    caller's I/O on another core. The thread is a plain (non-daemon) one that never outlives the ``with``
    block, even when the block raises: no hashing thread can be inside native code when the interpreter
    finalizes, and a background save still in flight at exit (its thread is joined before finalization)
    can start one. With ``threaded=False`` (small files) the buffers are hashed in the caller's thread.

    Args:
        algorithm: one of :data:`CHECKSUMS`.
        threaded: whether to hash in a thread (worth it from about a megabyte).
        free: where each buffer given with ``recycle`` goes back once hashed, for the caller to refill.

    Example:
        >>> with HashThread("xxh3_128") as hashing:
        ...     hashing.update(memoryview(b"abc"))
        ...     digest = hashing.hexdigest()
        >>> digest[:8]
        '06b05ab6'
    """

    def __init__(
        self, algorithm: str, *, threaded: bool = True, free: queue.SimpleQueue[Any] | None = None
    ) -> None:
        self._hasher = new_hasher(algorithm)
        self._free = free
        self._error: BaseException | None = None
        self._pending: queue.SimpleQueue[tuple[memoryview, Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="steadyfit-hash") if threaded else None
        if self._thread is not None:
            self._thread.start()

    def update(self, view: memoryview, *, recycle: Any = None) -> None:
        """Hash ``view`` after the buffers given before; ``recycle`` goes to ``free`` once it is hashed.

        The caller must not change ``view``'s bytes until they are hashed (:meth:`hexdigest` returned, or
        ``recycle`` came back).
        """
        if self._thread is None:
            self._hash(view, recycle)
        else:
            self._pending.put((view, recycle))

    def hexdigest(self) -> str:
        """Wait until every buffer is hashed, join the thread, and return the digest.

        Raises:
            BaseException: whatever the hasher raised.
        """
        self._join()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            self._hash(*item)

    def _hash(self, view: memoryview, recycle: Any) -> None:
        if self._error is None:
            try:
                self._hasher.update(view)
            except BaseException as exc:  # re-raised by hexdigest() in the caller's thread
                self._error = exc
        if recycle is not None and self._free is not None:
            self._free.put(recycle)


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

    The checksum is taken from the buffers in memory, never by reading the file back: for a large file
    (``size``, the total, known in advance) in a :class:`HashThread` that hashes each buffer while this
    thread writes it, and finishes while the fsync waits on the disk.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> write_chunks_durable(target, [b"ab", memoryview(b"c")], size=3) == write_bytes_durable(
        ...     target.with_name("y.bin"), b"abc"
        ... )
        True
    """
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with HashThread(CHECKSUM, threaded=size >= _THREADED_HASH_BYTES) as hashing:
            for view in views:
                hashing.update(view)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
            digest = hashing.hexdigest()
    finally:
        os.close(fd)
    return FileRecord(size=sum(len(view) for view in views), digest=digest)


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
    """Fsync a file written by someone else (DCP's shard writer) and hash it in one read.

    Only for files whose bytes never passed through steadyfit: everything steadyfit writes itself is hashed
    from memory as it is written (:func:`write_chunks_durable`).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> sync_and_hash(target).digest[:8]
        '06b05ab6'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        os.fsync(fd)
        record, _ = _hash_stream(stream, CHECKSUM, keep=False, expected=os.fstat(fd).st_size)
    return record


def hash_file(
    path: Path, *, algorithm: str = CHECKSUM, keep: bool = False, size: int | None = None
) -> tuple[FileRecord, torch.Tensor | None]:
    """Hash a file without following a symlink; with ``keep`` also return its bytes (read exactly once).

    The file is hashed chunk by chunk in a :class:`HashThread` while the next chunk is read. The kept bytes
    are one uint8 tensor, read straight into its memory, so tensors can be built as views of the verified
    bytes without a second copy. With ``size`` (what the manifest says), a file of any other size once
    opened is neither read nor kept: its record has the size found and an empty digest, so a file swapped
    for a larger one after the caller's size check never costs an allocation of its size.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> hash_file(target, keep=True)[1].numpy().tobytes()
        b'abc'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        found = os.fstat(fd).st_size
        if size is not None and found != size:
            return FileRecord(size=found, digest="", algorithm=algorithm), None
        return _hash_stream(stream, algorithm, keep=keep, expected=found)


def _hash_stream(
    stream: Any, algorithm: str, *, keep: bool, expected: int
) -> tuple[FileRecord, torch.Tensor | None]:
    """``expected``: the open file's size (fstat), which sizes the buffers."""
    threaded = expected >= _THREADED_HASH_BYTES
    if keep:
        # The whole file in one buffer (not zero-filled: every byte kept is read into it), hashed a chunk
        # at a time behind the read. A file that changed size since the fstat shows as a size mismatch.
        kept = torch.empty(expected, dtype=torch.uint8)
        view = memoryview(kept.numpy())
        size = 0
        with HashThread(algorithm, threaded=threaded) as hashing:
            while size < expected and (count := stream.readinto(view[size : size + _CHUNK_BYTES])):
                hashing.update(view[size : size + count])
                size += count
            if size == expected and stream.read(1):
                size += 1  # grew while being read: reported as a size mismatch, never verified
            digest = hashing.hexdigest()
        return FileRecord(size=size, digest=digest, algorithm=algorithm), kept[:size]
    # Only the digest is wanted: a few chunk buffers go round between this thread (reading into one) and
    # the hash thread (handing each back once hashed).
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    for _ in range(_READ_BUFFERS if threaded else 1):
        free.put(memoryview(bytearray(min(_CHUNK_BYTES, max(expected, 1)))))
    size = 0
    with HashThread(algorithm, threaded=threaded, free=free) as hashing:
        while count := stream.readinto(buffer := free.get()):
            hashing.update(buffer[:count], recycle=buffer)
            size += count
        digest = hashing.hexdigest()
    return FileRecord(size=size, digest=digest, algorithm=algorithm), None


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
