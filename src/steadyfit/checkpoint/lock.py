"""RunLock: one writer per run directory, through an advisory ``flock`` on ``RUN_DIR/.lock``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Self

from steadyfit.checkpoint.errors import RunLockedError
from steadyfit.layout import LOCK_FILE


class RunLock:
    """Exclusive lock on a run directory, held from ``__enter__`` (or :meth:`acquire`) to release.

    The kernel drops an ``flock`` when its process dies, SIGKILL included, so a crashed run never leaves a
    stale lock. The file itself stays (deleting it would let two processes lock two different inodes); its
    text records the holder's pid and host for humans. A process forked while it is held (a DataLoader
    worker) closes its copy of the lock at once, so an orphaned worker never keeps the lock of a run that
    died.

    Example:
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> with RunLock(run_dir):
        ...     try:
        ...         RunLock(run_dir).acquire()
        ...     except RunLockedError:
        ...         print("refused")
        refused
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating the run directory if needed.

        Raises:
            RunLockedError: another process (or another RunLock in this one) holds it.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"lock file {self.path} is held{holder}: another run is using the directory {self.run_dir}. "
                "Wait for it to finish, stop it, or use another run_dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\nhost {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def is_held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.release()


# The locks this process holds. An flock belongs to the open file description, which a fork shares: a
# forked child (a DataLoader worker) would hold the lock as long as it lives, and an orphaned one outlives a
# SIGKILLed run by seconds, refusing its rerun. Each child closes its copies at once (never LOCK_UN, which
# would unlock the parent's too) and holds none.
_HELD: set[RunLock] = set()


def _close_held_locks_in_child() -> None:
    for lock in _HELD:
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def is_locked(run_dir: str | os.PathLike[str]) -> bool:
    """Whether a run holds ``run_dir``'s lock now (a run writing it), without taking or changing the lock.

    Example:
        >>> import tempfile
        >>> run_dir = tempfile.mkdtemp()
        >>> with RunLock(run_dir):
        ...     print(is_locked(run_dir))
        True
        >>> is_locked(run_dir)
        False
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # no lock file: no run ever held one here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused while a run holds it exclusively
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock, if taken
    return False


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        return ""
    fields = dict(zip(text[::2], text[1::2], strict=False))
    if "pid" in fields and "host" in fields:
        return f" by pid {fields['pid']} on {fields['host']}"
    return ""
