"""Safetensors files of a checkpoint: written straight from the tensors' memory, read straight into tensors
of their own, hashed on the way through both times.

The layout is safetensors' own (``safetensors.torch.load_file`` reads what :func:`write_tensor_file`
writes, and :func:`read_tensor_file` reads what ``save_file`` writes): a little-endian u64 header length, a
JSON header, then the tensors' bytes. Reading is as strict as safetensors: known dtypes, shapes that match
their byte ranges, ranges that tile the body exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from steadyfit.checkpoint.atomic import FileRecord, HashedReader, write_chunks_durable
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import SAFETENSORS_DTYPES, dumps_json, loads_json

_HEADER_LENGTH_BYTES = 8
# Tensors below this are read in runs of about _SMALL_RUN_BYTES and copied out of the run's buffer.
_SMALL_TENSOR_BYTES = 64 * 1024
_SMALL_RUN_BYTES = 1024 * 1024
_Span = tuple[int, int, str, torch.dtype, list[int]]


def write_tensor_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> FileRecord:
    """Write contiguous CPU ``tensors`` as a safetensors file straight from their memory, hashing as it goes.

    The tensors' bytes follow the header largest element size first, so every tensor stays aligned. Unlike
    ``save_file``, no tensor is copied to a Python ``bytes`` and the file is not read back to be hashed. The
    tensors were checked storable before the save touched the disk. ``metadata`` goes in the header's
    ``__metadata__``, its keys sorted: the same tensors and metadata always give the same bytes.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> write_tensor_file(target, {"w": torch.ones(2)}).size  # 8 + a 56-byte header + 8
        72
    """
    _require_little_endian(path)
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = dumps_json(header)
    header_bytes += b" " * (-len(header_bytes) % 8)
    chunks: list[Any] = [len(header_bytes).to_bytes(_HEADER_LENGTH_BYTES, "little"), header_bytes]
    # A uint8 view of each tensor's own memory (flattened first: a 0-dim tensor has no byte view).
    chunks += [tensors[name].reshape(-1).view(torch.uint8).numpy() for name in order if tensors[name].numel()]
    return write_chunks_durable(path, chunks, size=_HEADER_LENGTH_BYTES + len(header_bytes) + offset)


def read_tensor_file(
    reader: HashedReader, size: int, where: Path
) -> dict[str, torch.Tensor] | CheckpointError:
    """The tensors of a safetensors file of ``size`` bytes, each read from ``reader`` into a storage of its
    own; for :func:`~steadyfit.checkpoint.atomic.hash_file`'s ``read``.

    The header is parsed before the file is verified (it says where each tensor's bytes go), strictly and
    without running code; nothing read is used until the caller has compared the file's digest. A file
    that is not valid safetensors gives the error to raise once its bytes are verified (until then the
    fault may be damage, which the digest names), and the rest of the file is left to be hashed.

    Each tensor is allocated alone, as ``torch.load`` allocates them: offset 0 into a storage of exactly
    its size (``torch.set_rng_state`` and other C++ consumers read the storage, not the view), freed on its
    own, and in the allocator's reusable memory when small enough, where one buffer for the whole file
    would be fresh pages from the kernel on every load (a page fault per 4 KiB).

    Example:
        >>> import tempfile
        >>> from steadyfit.checkpoint.atomic import hash_file
        >>> target = Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> size = write_tensor_file(target, {"w": torch.ones(2)}).size
        >>> hash_file(target, read=lambda reader: read_tensor_file(reader, size, target))[1]
        {'w': tensor([1., 1.])}
    """
    _require_little_endian(where)

    def malformed(why: str) -> CheckpointError:
        return CheckpointError(f"{where} is not a valid safetensors file: {why}")

    prefix = reader.read_bytes(_HEADER_LENGTH_BYTES)
    if len(prefix) < _HEADER_LENGTH_BYTES:
        return malformed("shorter than its header length")
    header_len = int.from_bytes(prefix, "little")
    body_start = _HEADER_LENGTH_BYTES + header_len
    if body_start > size:
        return malformed(f"header length {header_len} exceeds the file")
    try:
        header = loads_json(reader.read_bytes(header_len), where=f"{where} header")
    except CheckpointError as exc:
        return exc
    if not isinstance(header, dict):
        return malformed("header is not a JSON object")
    header.pop("__metadata__", None)
    body_len = size - body_start
    spans = []
    for name, info in header.items():
        dtype_name = info.get("dtype") if isinstance(info, dict) else None
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            dtype is None
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
        ):
            return malformed(f"bad header entry for {name!r}")
        start, end = offsets
        if not 0 <= start <= end <= body_len or end - start != math.prod(shape) * dtype.itemsize:
            return malformed(f"byte range of {name!r} does not fit its shape or the file")
        spans.append((start, end, name, dtype, shape))
    spans.sort(key=lambda span: span[:2])
    position = 0
    for start, end, name, _, _ in spans:
        if start != position:
            return malformed(f"tensor {name!r} does not start where the previous one ends")
        position = end
    if position != body_len:
        return malformed("bytes after the last tensor")
    tensors = {}
    for group in _read_groups(spans):
        first = group[0][0]
        buffer = torch.empty(group[-1][1] - first, dtype=torch.uint8)
        if reader.readinto(memoryview(buffer.numpy())) < len(buffer):
            break  # the file shrank while being read: its size mismatch is the fault reported
        for start, end, name, dtype, shape in group:
            raw = buffer if len(group) == 1 else buffer[start - first : end - first].clone()
            tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def _read_groups(spans: list[_Span]) -> list[list[_Span]]:
    """Spans in file order, a large tensor alone (read straight into its memory), runs of small ones
    together (read at once, then each copied out: a read and a hash call per tensor would cost more than
    the copy)."""
    groups: list[list[_Span]] = []
    for span in spans:
        run = groups[-1] if groups else []
        joins = (
            span[1] - span[0] < _SMALL_TENSOR_BYTES
            and run
            and run[-1][1] - run[-1][0] < _SMALL_TENSOR_BYTES
            and run[-1][1] - run[0][0] < _SMALL_RUN_BYTES
        )
        if joins:
            run.append(span)
        else:
            groups.append([span])
    return groups


def _require_little_endian(path: Path) -> None:
    # safetensors stores little-endian bytes; these tensors are written and read in the host's own order.
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: steadyfit reads and writes checkpoints on little-endian hosts only")
