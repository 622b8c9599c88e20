"""How a batch made in a DataLoader worker reaches the training process: small tensors by value.

torch hands every tensor of a worker's batch over through shared memory: the worker creates a segment per
tensor (``default_collate`` stacks straight into one), and the training process receives its file
descriptor over a socket after an authenticated handshake, then maps it. For a large tensor that beats
copying it; for a small one the fixed cost is all there is: 0.6-1 ms of CPU in the worker and as much in
the training process per tensor on the 2-core bench machine (bench/worker_transfer.py), which is more than
a training step of a small model. Here a tensor of at most :data:`BY_VALUE_MAX_BYTES` is stacked in
ordinary memory and pickled with its bytes; larger ones keep torch's shared memory. The training process
gets the same values, dtypes and shapes either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

# Above this size a tensor goes through shared memory. Measured with bench/worker_transfer.py on the 2-core
# bench machine: by value is 3x cheaper at 64 KiB, about even at 256 KiB, dearer from 512 KiB on.
BY_VALUE_MAX_BYTES = 128 * 1024


class _TensorBytes:
    """A tensor that pickles as its bytes: unpickled, it is a plain tensor again (see :func:`_rebuild`)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
        tensor = self.tensor
        # A bytearray, not bytes: the tensor built over it in the training process is writable.
        raw = bytearray(tensor.reshape(-1).view(torch.uint8).numpy())
        return _rebuild, (raw, tensor.dtype, tuple(tensor.shape))


def _rebuild(raw: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses an empty buffer
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def _travels_by_value(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) is torch.Tensor
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and not (tensor.requires_grad or tensor.is_quantized or tensor.is_conj() or tensor.is_neg())
        and tensor.nbytes <= BY_VALUE_MAX_BYTES
    )


def by_value(batch: Any) -> Any:
    """``batch`` with each small CPU tensor wrapped to pickle by value, in tuples, lists, named tuples and
    mappings (a transformers ``BatchEncoding`` too); anything else, and every large tensor, as it is.

    Example:
        >>> import pickle
        >>> batch = pickle.loads(pickle.dumps(by_value({"x": torch.ones(2, 3)})))
        >>> batch["x"].shape, batch["x"].dtype
        (torch.Size([2, 3]), torch.float32)
    """
    if isinstance(batch, torch.Tensor):
        return _TensorBytes(batch) if _travels_by_value(batch) else batch
    if type(batch) in (tuple, list):
        return type(batch)(by_value(item) for item in batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(by_value(item) for item in batch))
    if isinstance(batch, MutableMapping):
        try:
            converted = copy.copy(batch)  # a dict, or a BatchEncoding with its own copy of the data
            for key, value in batch.items():
                converted[key] = by_value(value)
        except (TypeError, ValueError, AttributeError):
            return batch  # a mapping that will not hold the stand-ins: torch's shared memory, as before
        return converted
    return batch


def _stack(batch: list[torch.Tensor], *, collate_fn_map: dict[Any, Callable[..., Any]] | None = None) -> Any:
    """``default_collate``'s stack of tensors, in ordinary memory when the result is small enough to be sent
    by value (torch's own stacks straight into a shared-memory segment in a worker)."""
    first = batch[0]
    small = sum(tensor.numel() for tensor in batch) * first.element_size() <= BY_VALUE_MAX_BYTES
    # Sparse and nested tensors go to torch's own, which refuses them with its message.
    if small and first.layout == torch.strided and not first.is_nested:
        return torch.stack(batch, 0)
    return collate_tensor_fn(batch, collate_fn_map=collate_fn_map)


_COLLATE_MAP = {**default_collate_fn_map, torch.Tensor: _stack}


def default_collate_by_value(samples: list[Any]) -> Any:
    """torch's ``default_collate``, with small stacks in ordinary memory (see :func:`_stack`)."""
    return collate(samples, collate_fn_map=_COLLATE_MAP)


class WorkerCollate:
    """The ``collate_fn`` of a DataLoader whose workers steadyfit starts: the user's collate (torch's
    default one, stacking small tensors in ordinary memory, when there is none), then :func:`by_value`.

    A class, not a closure: under the ``spawn`` start method the workers receive it pickled.

    Example:
        >>> import pickle
        >>> batch = WorkerCollate(None)([(torch.ones(2), 0), (torch.zeros(2), 1)])
        >>> pickle.loads(pickle.dumps(batch))[1]  # what the training process receives
        tensor([0, 1])
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        batch = default_collate_by_value(samples) if self.collate_fn is None else self.collate_fn(samples)
        return by_value(batch)
