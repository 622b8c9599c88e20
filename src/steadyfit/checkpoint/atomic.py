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
from collections.abc import Callable, Iterable
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
    replace_with(path, lambda tmp: write_bytes_durable(tmp, data))


def replace_with(path: Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` with the file ``write`` creates (durably) at the path it is given, atomically as
    :func:`replace_file` does."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash between the write and the rename
    write(tmp)
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
        record, _ = _hash_stream(stream, CHECKSUM, expected=os.fstat(fd).st_size, read=None)
    return record


def hash_file(
    path: Path,
    *,
    algorithm: str = CHECKSUM,
    keep: bool = False,
    size: int | None = None,
    read: Callable[[HashedReader], Any] | None = None,
) -> tuple[FileRecord, Any]:
    """Hash a file without following a symlink; with ``keep`` also return its bytes (read exactly once).

    The file is hashed chunk by chunk in a :class:`HashThread` while the next chunk is read. The kept bytes
    are one uint8 tensor, read straight into its memory. With ``read`` the bytes go where it puts them
    instead (the checkpoint's tensor files: straight into their tensors): it reads them
    through the :class:`HashedReader` it is given and what it returns is returned (the bytes it leaves
    are hashed, not kept). With ``size`` (what the manifest says), a file of any other size once opened is
    neither read nor kept: its record has the size found and an empty digest, so a file swapped for a
    larger one after the caller's size check never costs an allocation of its size.

    Nothing kept is checked: the caller compares the record with what it expects before using it.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = target.write_bytes(b"abc")
        >>> hash_file(target, keep=True)[1].numpy().tobytes()
        b'abc'
        >>> hash_file(target, read=lambda reader: reader.read_bytes(2))[1]
        b'ab'
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        found = os.fstat(fd).st_size
        if size is not None and found != size:
            return FileRecord(size=found, digest="", algorithm=algorithm), None
        if keep and read is None:
            read = _read_whole(found)
        return _hash_stream(stream, algorithm, expected=found, read=read)


class HashedReader:
    """Reads an open file's bytes into buffers the caller chooses, in file order, handing every byte read
    to a :class:`HashThread`; what :func:`hash_file`'s ``read`` is given.

    ``count`` is how many bytes have been read so far.

    Example:
        >>> import io
        >>> with HashThread("xxh3_128", threaded=False) as hashing:
        ...     reader = HashedReader(io.BytesIO(b"abcd"), hashing)
        ...     head = reader.read_bytes(1)
        ...     rest = bytearray(3)
        ...     filled = reader.readinto(memoryview(rest))
        >>> head, bytes(rest), reader.count
        (b'a', b'bcd', 4)
    """

    def __init__(self, stream: Any, hashing: HashThread) -> None:
        self._stream = stream
        self._hashing = hashing
        self.count = 0

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (short only at the end of the file); the number of bytes read. The caller must not
        change them until the digest is taken."""
        filled = 0
        while filled < len(view) and (count := self._stream.readinto(view[filled : filled + _CHUNK_BYTES])):
            self._hashing.update(view[filled : filled + count])
            filled += count
        self.count += filled
        return filled

    def read_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer only at the end of the file)."""
        buffer = bytearray(n)
        return bytes(buffer[: self.readinto(memoryview(buffer))])

    def skip(self, limit: int, free: queue.SimpleQueue[memoryview]) -> None:
        """Hash up to ``limit`` further bytes without keeping them, reading into the buffers of ``free``,
        each handed back once hashed."""
        while self.count < limit:
            buffer = free.get()
            if not (count := self._stream.readinto(buffer[: limit - self.count])):
                return
            self._hashing.update(buffer[:count], recycle=buffer)
            self.count += count


def _read_whole(size: int) -> Callable[[HashedReader], torch.Tensor]:
    def read(reader: HashedReader) -> torch.Tensor:
        # One buffer for the file, not zero-filled: every byte kept is read into it.
        kept = torch.empty(size, dtype=torch.uint8)
        return kept[: reader.readinto(memoryview(kept.numpy()))]

    return read


def _hash_stream(
    stream: Any, algorithm: str, *, expected: int, read: Callable[[HashedReader], Any] | None
) -> tuple[FileRecord, Any]:
    """``expected``: the open file's size (fstat), which sizes the buffers. At most ``expected`` + 1 bytes
    are read: a file that grew while being read shows as a size mismatch and is never verified."""
    threaded = expected >= _THREADED_HASH_BYTES
    # What ``read`` leaves (all of the file without it) is hashed through a few chunk buffers that go round
    # between this thread (reading into one) and the hash thread (handing each back once hashed).
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    with HashThread(algorithm, threaded=threaded, free=free) as hashing:
        reader = HashedReader(stream, hashing)
        kept = read(reader) if read is not None else None
        left = expected + 1 - reader.count
        for _ in range(min(_READ_BUFFERS if threaded else 1, -(-left // _CHUNK_BYTES))):
            free.put(memoryview(bytearray(min(_CHUNK_BYTES, left))))
        reader.skip(expected + 1, free)
        digest = hashing.hexdigest()
    return FileRecord(size=reader.count, digest=digest, algorithm=algorithm), kept


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
