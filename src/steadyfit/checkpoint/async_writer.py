"""AsyncCheckpointWriter: the caller only snapshots state to host memory; a background thread writes it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import torch

from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import snapshot
from steadyfit.checkpoint.store import CheckpointStore


class AsyncCheckpointWriter:
    """Saves checkpoints through a :class:`CheckpointStore` in a background thread, one at a time.

    :meth:`submit` blocks the caller only while it waits for the previous save and copies every tensor to
    CPU memory; the caller may mutate its tensors as soon as it returns. A failed background save is
    re-raised as :class:`CheckpointError` (with the original exception as ``__cause__``) by the next
    :meth:`submit`, :meth:`wait` or :meth:`close`. The writer thread is not a daemon, so an interpreter
    that exits normally still finishes the save in flight.

    Attributes:
        blocked_s: seconds the last :meth:`submit` blocked its caller (waiting plus snapshot).
        last_path: the most recently committed checkpoint directory, or None.

    Example:
        >>> import tempfile
        >>> weights = torch.ones(3)
        >>> with AsyncCheckpointWriter(CheckpointStore(tempfile.mkdtemp())) as writer:
        ...     writer.submit(10, {"w": weights}, {"trainer": {"step": 10}})
        ...     _ = weights.zero_()  # safe: the writer saves its own copy
        ...     path = writer.wait()
        >>> path.name
        'step-00000010'
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.blocked_s = 0.0
        self.last_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self._closed = False
        # The host copies of the last save, refilled by the next one once it is written (see snapshot): the
        # cost is one host copy of the state held between saves, released by close().
        self._staging: dict[str, torch.Tensor] = {}

    def submit(
        self,
        step: int,
        model_state: Mapping[str, torch.Tensor],
        components: Mapping[str, Any],
        extra_files: Mapping[str, bytes] | None = None,
        on_done: Callable[[Path], None] | None = None,
    ) -> None:
        """Snapshot the state and start saving it in the background.

        Args:
            step, model_state, components, extra_files: as :meth:`CheckpointStore.save`.
            on_done: called as ``on_done(path)`` in the writer thread after the commit (e.g. to rotate);
                an exception it raises counts as a failed save.

        Raises:
            CheckpointError: the previous save failed, or a value cannot be stored (nothing submitted).
            RuntimeError: the writer is closed.
        """
        start = time.perf_counter()
        if self._closed:
            raise RuntimeError("AsyncCheckpointWriter is closed; create a new one to save again")
        self._join()
        staging: dict[str, torch.Tensor] = {}
        model_copy = snapshot(dict(model_state), where="model", reuse=self._staging, kept=staging)
        components_copy = snapshot(dict(components), where="components", reuse=self._staging, kept=staging)
        self._staging = staging  # positions gone from the state are dropped
        extra_copy = {name: bytes(data) for name, data in (extra_files or {}).items()}
        self._thread = threading.Thread(
            target=self._run,
            args=(step, model_copy, components_copy, extra_copy, on_done),
            name=f"steadyfit-checkpoint-{step}",
        )
        self._thread.start()
        self.blocked_s = time.perf_counter() - start

    def wait(self) -> Path | None:
        """Block until no save is in flight; return the last committed path.

        Raises:
            CheckpointError: the save in flight (or an earlier one not yet reported) failed.
        """
        self._join()
        return self.last_path

    def close(self) -> Path | None:
        """Wait for the save in flight, then refuse further submits; return the last committed path."""
        self._closed = True
        try:
            return self.wait()
        finally:
            self._staging = {}

    def is_busy(self) -> bool:
        """Whether a save is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Already unwinding: finish the save but let the original exception propagate.
        self._closed = True
        if self._thread is not None:
            self._thread.join()

    def _run(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        components: dict[str, Any],
        extra_files: dict[str, bytes],
        on_done: Callable[[Path], None] | None,
    ) -> None:
        try:
            path = self.store.save(step, model_state, components, extra_files=extra_files)
            self.last_path = path
            if on_done is not None:
                on_done(path)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._error = (step, exc)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            step, exc = self._error
            self._error = None
            raise CheckpointError(f"background checkpoint save of step {step} failed: {exc}") from exc
