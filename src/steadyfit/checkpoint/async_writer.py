"""AsyncCheckpointWriter: the caller snapshots state to host memory, or leaves part of that copy to the
background thread that writes it."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch

from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import snapshot
from steadyfit.checkpoint.staging import DeferredCopies
from steadyfit.checkpoint.store import CheckpointStore


class AsyncCheckpointWriter:
    """Saves checkpoints through a :class:`CheckpointStore` in a background thread, one at a time.

    :meth:`submit` blocks the caller only while it waits for the previous save and copies every tensor to
    CPU memory; the caller may mutate its tensors as soon as it returns. Tensors named in ``copy_later``
    are copied by the background thread instead, overlapping the caller's work (a training step's forward
    and backward): the caller calls :meth:`wait_staged` before it modifies any of them (before its next
    optimizer step). A failed background save is re-raised as :class:`CheckpointError` (with the original
    exception as ``__cause__``) by the next :meth:`submit`, :meth:`wait` or :meth:`close`. The writer
    thread is not a daemon, so an interpreter that exits normally still finishes the save in flight.

    Attributes:
        blocked_s: seconds the last save blocked its caller: its :meth:`submit` (waiting plus snapshot) and
            its :meth:`wait_staged`.
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

        With the optimizer state copied while the next step computes its gradients::

            writer.submit(step, model.state_dict(), {"optimizer": optimizer.state_dict()},
                          copy_later=optimizer_state_tensors)
            loss.backward()  # the next step's forward and backward: the copy overlaps them
            writer.wait_staged()
            optimizer.step()
    """

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.blocked_s = 0.0
        self.last_path: Path | None = None
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        # Set by the writer thread once the copies submit left to it are made, and once it is done.
        self._staged: threading.Event | None = None
        self._done = threading.Event()
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
        copy_later: Iterable[torch.Tensor] = (),
    ) -> None:
        """Snapshot the state and start saving it in the background.

        Args:
            step, model_state, components, extra_files: as :meth:`CheckpointStore.save`.
            on_done: called as ``on_done(path)`` in the writer thread after the commit (e.g. to rotate);
                an exception it raises counts as a failed save.
            copy_later: tensors the background thread copies before it writes (any entry of the state
                that lives in their memory; all of them at once when their storages hold less than
                ``DeferredCopies.MIN_BYTES``); the caller must not modify them before :meth:`wait_staged`.

        Raises:
            CheckpointError: the previous save failed, or a value cannot be stored (nothing submitted).
            RuntimeError: the writer is closed.
        """
        start = time.perf_counter()
        if self._closed:
            raise RuntimeError("AsyncCheckpointWriter is closed; create a new one to save again")
        self._join()
        staging: dict[str, torch.Tensor] = {}
        deferred = DeferredCopies(copy_later)
        copy = functools.partial(snapshot, reuse=self._staging, kept=staging, deferred=deferred)
        model_copy = copy(dict(model_state), where="model")
        components_copy = copy(dict(components), where="components")
        self._staging = staging  # positions gone from the state are dropped
        extra_copy = {name: bytes(data) for name, data in (extra_files or {}).items()}
        self._staged, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(step, deferred, self._staged, self._done, model_copy, components_copy, extra_copy, on_done),
            name=f"steadyfit-checkpoint-{step}",
        )
        try:
            self._thread.start()
        except BaseException:
            if self._thread.ident is None:  # it never ran: nothing reads the caller's tensors
                self._thread = self._staged = None
            else:  # interrupted once it ran (start() waits for that): it copies the caller's tensors now
                _wait_through_interrupts(self._staged)
            raise
        self.blocked_s = time.perf_counter() - start

    def wait_staged(self) -> None:
        """Block until the background thread has copied the tensors the last :meth:`submit` left to it
        (``copy_later``); from then on the caller may modify them. Cheap when there is nothing to wait for.
        """
        staged = self._staged
        if staged is None:
            return
        if not staged.is_set():
            start = time.perf_counter()
            _wait_through_interrupts(staged)
            self.blocked_s += time.perf_counter() - start
        self._staged = None

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
            self._join_thread(self._thread)

    def _run(
        self,
        step: int,
        deferred: DeferredCopies,
        staged: threading.Event,
        done: threading.Event,
        model_state: dict[str, torch.Tensor],
        components: dict[str, Any],
        extra_files: dict[str, bytes],
        on_done: Callable[[Path], None] | None,
    ) -> None:
        try:
            try:
                deferred.run()
            finally:
                staged.set()
            path = self.store.save(step, model_state, components, extra_files=extra_files)
            self.last_path = path
            if on_done is not None:
                on_done(path)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            self._error = (step, exc)
        finally:
            done.set()

    def _join(self) -> None:
        if self._thread is not None:
            self._join_thread(self._thread)
            self._thread = None
        self._staged = None
        if self._error is not None:
            step, exc = self._error
            self._error = None
            raise CheckpointError(f"background checkpoint save of step {step} failed: {exc}") from exc

    def _join_thread(self, thread: threading.Thread) -> None:
        try:
            # An event, not thread.join(): a join interrupted by a Ctrl-C leaves the thread looking finished
            # to the next join (Python 3.11), which would then return while the save is still written.
            self._done.wait()
        except BaseException:
            # Interrupted: the write may go on, but the caller runs on only once the thread no longer reads
            # its live tensors.
            if self._staged is not None:
                _wait_through_interrupts(self._staged)
            raise
        thread.join()


def _wait_through_interrupts(copied: threading.Event) -> None:
    """Wait for the writer thread's copies even through Ctrl-C, then re-raise it: they read the caller's
    live tensors, and they are a memory copy, over in moments."""
    interrupted: BaseException | None = None
    while True:
        try:
            copied.wait()
            break
        except BaseException as exc:  # KeyboardInterrupt, or whatever a signal handler raised
            interrupted = exc
    if interrupted is not None:
        raise interrupted
