"""DeferredCopies: the host copies of a snapshot that a background thread makes while training goes on."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DeferredCopies:
    """Tensors a snapshot leaves for another thread to copy to host memory, overlapping the next step.

    ``sources``: the tensors the caller promises not to modify until :meth:`run` has returned (the training
    loop waits for it before its next optimizer step). A snapshot asks :meth:`takes` of each tensor it
    meets; one of these (or a view of one) gets a host buffer now and its copy later, everything else is
    copied at once, and so is everything when the sources' storages hold less than :attr:`MIN_BYTES`. CUDA
    tensors are copied on a stream of the copying thread's own, after everything the caller's stream had
    queued when the snapshot took them, so the copy overlaps the caller's kernels.

    Example:
        >>> state = torch.ones(2 << 20)  # 8 MiB
        >>> later = DeferredCopies([state])
        >>> buffer = torch.empty(2 << 20)
        >>> later.takes(state), later.add(state, buffer)
        (True, None)
        >>> later.run()  # in the writer thread
        >>> bool(buffer.eq(1).all())
        True
    """

    # Sources smaller than this in all are copied at once: deferred, the loop would wait for the writer
    # thread to take the GIL and make the copy, some hundreds of microseconds that a copy of less does not
    # save (bench/README.md, "An async save's optimizer state, copied during the next step").
    MIN_BYTES = 8 << 20

    def __init__(self, sources: Iterable[torch.Tensor] = ()) -> None:
        storages = {}
        for tensor in sources:
            key = memory_of(tensor)
            if key is not None:
                storages[key] = tensor.untyped_storage().nbytes()
        self._storages = set(storages) if sum(storages.values()) >= self.MIN_BYTES else set()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Per CUDA device: an event after the caller's last kernel when the snapshot took the first tensor.
        self._queued: dict[torch.device, torch.cuda.Event] = {}

    def takes(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in the memory of one of the sources."""
        return bool(self._storages) and memory_of(tensor) in self._storages

    def add(self, source: torch.Tensor, buffer: torch.Tensor) -> None:
        """Copy ``source`` into the host tensor ``buffer`` (same shape and dtype) when :meth:`run` runs."""
        if source.is_cuda and source.device not in self._queued:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(source.device))
            self._queued[source.device] = event
        self._pending.append((source.detach(), buffer))

    @property
    def nbytes(self) -> int:
        """Bytes left to copy."""
        return sum(buffer.numel() * buffer.element_size() for _, buffer in self._pending)

    def run(self) -> None:
        """Make every copy (call once, in the thread that overlaps the caller's work)."""
        streams: dict[torch.device, torch.cuda.Stream] = {}
        for source, buffer in self._pending:
            if not source.is_cuda:
                buffer.copy_(source)
                continue
            stream = streams.get(source.device)
            if stream is None:
                stream = streams[source.device] = torch.cuda.Stream(source.device)
                stream.wait_event(self._queued[source.device])
            with torch.cuda.stream(stream):
                # Into pageable host memory: copy_ returns once the bytes are there.
                buffer.copy_(source)
        self._pending = []


def memory_of(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    """Where the tensor's storage is (the same for every view of it), or None for a tensor without plain
    storage of its own (sparse, meta, wrapper subclasses such as DTensor), which a snapshot copies at once.

    Example:
        >>> weights = torch.ones(4)
        >>> memory_of(weights[2:]) == memory_of(weights)
        True
    """
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        return None
    if tensor.device.type not in ("cpu", "cuda"):
        return None
    return tensor.device, tensor.untyped_storage().data_ptr()
