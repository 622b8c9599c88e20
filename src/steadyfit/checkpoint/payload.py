"""Nested state <-> (tensors for safetensors, a JSON structure referring to them), exactly and without pickle.

The JSON side is standard JSON (no ``NaN``/``Infinity`` tokens). Python values JSON cannot hold are written
as one-key tagged objects:

=====================  ==============================================================
``{"__tensor__": k}``  a torch.Tensor stored under key ``k`` of the safetensors file
``{"__ndarray__": k}`` a numpy array, stored as a tensor under ``k``
``{"__npscalar__": k}`` a numpy scalar (np.int64, np.float32, ...), stored as a 0-dim tensor
``{"__tuple__": [...]}`` a tuple (a plain JSON list is always a Python list)
``{"__dict__": [[k, v], ...]}`` a dict whose keys are not all strings (optimizer ``state`` has int keys),
                       or that has a key which is itself a tag
``{"__float__": "nan"}`` a non-finite float (``"inf"``, ``"-inf"``, ``"nan"``)
``{"__bytes__": "..."}`` bytes, base64
=====================  ==============================================================

Several references to one tensor are stored as separate copies (identity is not preserved).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from steadyfit.checkpoint.errors import CheckpointError, UnstorableValue
from steadyfit.checkpoint.staging import DeferredCopies

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The dtypes a safetensors file can hold, by their header name (those of safetensors' own torch API)."""
_STORABLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_NPSCALAR = "__npscalar__"
_TUPLE = "__tuple__"
_DICT = "__dict__"
_FLOAT = "__float__"
_BYTES = "__bytes__"
_TAGS = frozenset({_TENSOR, _NDARRAY, _NPSCALAR, _TUPLE, _DICT, _FLOAT, _BYTES})
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def flatten(state: Any, *, where: str = "state", prepare: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested ``state`` into tensors and a JSON-able structure that refers to them by key.

    Tensors are detached, moved to CPU and made contiguous (a copy only where needed); tensors sharing
    storage are cloned because safetensors refuses shared memory.

    Args:
        state: dicts, lists, tuples, None, bool, int, float, str, bytes, torch tensors, numpy arrays and
            numpy scalars, nested in any way.
        where: how error messages name the root of ``state``.
        prepare: False keeps torch tensors as they are (DTensor shards included, not copied), for
            torch.distributed.checkpoint, which writes them and loads into them in place.

    Returns:
        ``(tensors, structure)``; :func:`unflatten` inverts it.

    Raises:
        CheckpointError: a value of an unsupported type, naming where it is.

    Example:
        >>> tensors, structure = flatten({"step": 3, "m": torch.zeros(2)})
        >>> structure
        {'step': 3, 'm': {'__tensor__': 'm'}}
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()

    def add_tensor(tensor: torch.Tensor, path: str) -> str:
        # Keys read like the path inside the state ("state.0.exp_avg"), for humans inspecting the file.
        base = path.removeprefix(where).removeprefix(".") or "value"
        key = base
        suffix = 1
        while key in tensors:
            suffix += 1
            key = f"{base}#{suffix}"
        tensors[key] = _prepare_tensor(tensor, path, seen_storages) if prepare else tensor
        return key

    def encode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, np.generic):
            return {_NPSCALAR: add_tensor(_numpy_to_tensor(np.asarray(value), path), path)}
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _encode_float(value)
        if isinstance(value, torch.Tensor):
            return {_TENSOR: add_tensor(value, path)}
        if isinstance(value, np.ndarray):
            return {_NDARRAY: add_tensor(_numpy_to_tensor(value, path), path)}
        if isinstance(value, bytes):
            return {_BYTES: base64.b64encode(value).decode("ascii")}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {key: encode(item, f"{path}.{key}") for key, item in value.items()}
            return {
                _DICT: [
                    [_encode_key(key, path), encode(item, f"{path}.{key}")] for key, item in value.items()
                ]
            }
        raise UnstorableValue(
            f"cannot store {path}: values of type {type(value).__name__} are not supported (use tensors, "
            "numbers, strings, bytes, None, and dicts, lists and tuples of them)",
            type(value).__name__,
        )

    structure = encode(state, where)
    return tensors, structure


def prepare_tensors(tensors: dict[str, torch.Tensor], *, where: str = "model") -> dict[str, torch.Tensor]:
    """Make a flat name -> tensor mapping savable by safetensors, keeping the names.

    Tensors are detached, moved to CPU and made contiguous (a copy only where needed); tensors that share
    storage, such as tied weights, are cloned.

    Raises:
        CheckpointError: a key is not a string or a value is not a dense tensor, naming it.

    Example:
        >>> weight = torch.ones(2, 2)
        >>> sorted(prepare_tensors({"embed": weight, "head": weight}))
        ['embed', 'head']
    """
    seen_storages: set[tuple[str, int]] = set()
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{where}: expected str -> torch.Tensor, got {name!r} -> {type(tensor).__name__}"
            )
        prepared[name] = _prepare_tensor(tensor, f"{where}[{name!r}]", seen_storages)
    return prepared


def unflatten(structure: Any, tensors: dict[str, torch.Tensor], *, where: str = "state") -> Any:
    """Inverse of :func:`flatten`: rebuild the nested state from its structure and tensors.

    Raises:
        CheckpointError: the structure is malformed or refers to a missing tensor.

    Example:
        >>> tensors, structure = flatten({"state": {0: {"step": torch.tensor(1.0)}}})
        >>> unflatten(structure, tensors)
        {'state': {0: {'step': tensor(1.)}}}
    """

    def tensor(key: Any, path: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"{where}: {path} refers to a tensor {key!r} that is not in the file")
        return tensors[key]

    def decode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [decode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: unexpected JSON value at {path}")
        tags = _TAGS.intersection(value)
        if not tags:
            return {key: decode(item, f"{path}.{key}") for key, item in value.items()}
        if len(value) != 1:
            raise CheckpointError(f"{where}: malformed tagged object at {path}: {sorted(value)}")
        tag, body = next(iter(value.items()))
        if tag == _TENSOR:
            return tensor(body, path)
        if tag == _NDARRAY:
            return tensor(body, path).numpy()
        if tag == _NPSCALAR:
            return tensor(body, path).numpy()[()]
        if tag == _FLOAT and body in _NONFINITE:
            return _NONFINITE[body]
        if tag == _BYTES and isinstance(body, str):
            return base64.b64decode(body.encode("ascii"), validate=True)
        if tag == _TUPLE and isinstance(body, list):
            return tuple(decode(item, f"{path}.{i}") for i, item in enumerate(body))
        if tag == _DICT and isinstance(body, list) and all(_is_pair(item) for item in body):
            return {decode(key, f"{path}.<key>"): decode(item, f"{path}.{key}") for key, item in body}
        raise CheckpointError(f"{where}: malformed {tag} object at {path}")

    return decode(structure, "state")


def tensor_keys(structure: Any) -> set[str]:
    """The tensor keys a :func:`flatten` structure refers to (tensors, numpy arrays and numpy scalars).

    Example:
        >>> tensors, structure = flatten({"state": {0: {"step": torch.tensor(1.0)}}, "lr": 0.1})
        >>> tensor_keys(structure)
        {'state.0.step'}
    """
    keys: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            if len(value) == 1 and next(iter(value)) in (_TENSOR, _NDARRAY, _NPSCALAR):
                body = next(iter(value.values()))
                if isinstance(body, str):
                    keys.add(body)
                return
            for item in value.values():
                visit(item)

    visit(structure)
    return keys


def snapshot(
    state: Any,
    *,
    where: str = "state",
    reuse: Mapping[str, torch.Tensor] | None = None,
    kept: dict[str, torch.Tensor] | None = None,
    deferred: DeferredCopies | None = None,
) -> Any:
    """Deep copy of ``state`` with every tensor copied to CPU memory, so the caller may keep mutating it.

    Accepts exactly the types :func:`flatten` accepts and raises the same errors, so a bad value fails in
    the caller's thread rather than later in a background writer.

    ``reuse``: host tensors of an earlier snapshot that nothing uses any more, by position in the state; a
    tensor of the same shape, dtype and strides is copied into the buffer at its position instead of a new
    one (fresh memory is zeroed page by page by the kernel on first touch: for a large state that costs as
    much as the copy itself). ``kept`` receives this snapshot's buffers by position, for the next one.

    ``deferred``: a tensor it :meth:`~DeferredCopies.takes` gets its host buffer now and its copy when the
    caller runs it (the caller must not modify that tensor before), every other one is copied now.

    Example:
        >>> weights = torch.ones(2)
        >>> copy = snapshot({"w": weights})
        >>> _ = weights.zero_()
        >>> copy["w"]
        tensor([1., 1.])
    """

    def copy(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            _check_storable(value, path)
            source = value.detach()
            buffer = reuse.get(path) if reuse is not None else None
            if buffer is not None and (buffer.shape, buffer.dtype, buffer.stride()) != (
                source.shape,
                source.dtype,
                source.stride(),
            ):
                buffer = None
            if deferred is not None and deferred.takes(source):
                buffer = torch.empty_like(source, device="cpu") if buffer is None else buffer
                deferred.add(source, buffer)
            elif buffer is None:
                # One copy, straight to host memory: training may modify the original right after this.
                buffer = source.to("cpu", copy=True)
            else:
                buffer.copy_(source)
            if kept is not None:
                kept[path] = buffer
            return buffer
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise CheckpointError(
                    f"cannot store {path}: numpy arrays of Python objects are not supported"
                )
            return value.copy()
        if value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
            return value
        if isinstance(value, tuple):
            return tuple(copy(item, f"{path}.{i}") for i, item in enumerate(value))
        if isinstance(value, list):
            return [copy(item, f"{path}.{i}") for i, item in enumerate(value)]
        if isinstance(value, dict):
            return {key: copy(item, f"{path}.{key}") for key, item in value.items()}
        raise CheckpointError(
            f"cannot store {path}: values of type {type(value).__name__} are not supported (use tensors, "
            "numbers, strings, bytes, None, and dicts, lists and tuples of them)"
        )

    return copy(state, where)


def dumps_json(structure: Any) -> bytes:
    """Standard JSON bytes (``allow_nan=False``: non-finite floats must already be tagged)."""
    return json.dumps(structure, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads_json(data: bytes, *, where: str) -> Any:
    """Parse standard JSON, refusing the non-standard ``NaN``/``Infinity`` tokens.

    Raises:
        CheckpointError: the bytes are not valid UTF-8 standard JSON, naming ``where``.
    """

    def reject_constant(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token}")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON: {exc}") from exc


def _encode_key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, str)):
        return key
    if isinstance(key, float):
        return _encode_float(key)
    if isinstance(key, tuple):
        return {_TUPLE: [_encode_key(item, path) for item in key]}
    raise UnstorableValue(
        f"cannot store {path}: dict key {key!r} of type {type(key).__name__} is not supported",
        f"dict key of type {type(key).__name__}",
    )


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return float(value)
    return {_FLOAT: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _prepare_tensor(tensor: torch.Tensor, path: str, seen_storages: set[tuple[str, int]]) -> torch.Tensor:
    tensor = tensor.detach()
    _check_storable(tensor, path)
    tensor = tensor.to("cpu").contiguous()
    storage = tensor.untyped_storage()
    storage_key = (str(tensor.device), storage.data_ptr())
    # safetensors refuses tensors that share memory (tied weights, views of one buffer).
    if storage.nbytes() > 0 and storage_key in seen_storages:
        return tensor.clone()
    seen_storages.add(storage_key)
    return tensor


def _check_storable(tensor: torch.Tensor, path: str) -> None:
    """Refuse, before anything is written, a tensor no checkpoint file can hold."""
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise UnstorableValue(
            f"cannot store {path}: only dense tensors with data can be saved", "sparse or meta tensor"
        )
    if tensor.dtype not in _STORABLE_DTYPES:
        raise UnstorableValue(
            f"cannot store {path}: dtype {tensor.dtype} has no safetensors name (convert it, e.g. .float())",
            f"tensor of dtype {tensor.dtype}",
        )


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2


def _numpy_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    try:
        # ascontiguousarray turns a 0-dim array into 1-dim; reshape keeps numpy scalars 0-dim.
        return torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))
    except TypeError as exc:
        raise UnstorableValue(
            f"cannot store {path}: numpy dtype {array.dtype} has no tensor equivalent",
            f"numpy array of dtype {array.dtype}",
        ) from exc
