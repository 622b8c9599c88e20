"""Nested state survives flatten -> safetensors/JSON -> unflatten exactly, with no pickle involved."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from steadyfit.checkpoint import CheckpointError
from steadyfit.checkpoint.payload import dumps_json, flatten, loads_json, snapshot, unflatten


def assert_identical(expected: object, actual: object, path: str = "state") -> None:
    """Same types (tuple is not list), same dict keys in the same order, tensors bitwise equal."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        as_bytes = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (expected, actual)]
        assert torch.equal(*as_bytes), f"{path}: tensor bytes differ"
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        assert actual.tobytes() == expected.tobytes(), path
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert type(key) is type(next(k for k in actual if k == key)), f"{path}: key type of {key!r}"
            assert_identical(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_identical(e, a, f"{path}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), path
    elif isinstance(expected, float):
        assert math.copysign(1.0, actual) == math.copysign(1.0, expected) and actual == expected, path
    else:
        assert actual == expected, path


def round_trip(state: object) -> object:
    """Through real bytes: safetensors for the tensors, standard JSON for the rest."""
    tensors, structure = flatten(state)
    text = dumps_json(structure)
    loaded_tensors = load_safetensors(save_safetensors(tensors)) if tensors else {}
    return unflatten(loads_json(text, where="test"), loaded_tensors)


def test_scalars_containers_and_keys_round_trip_exactly() -> None:
    state = {
        "ints": [0, -1, 2**70, True, False, None],
        "floats": (0.1, -0.0, 1e308, 5e-324, math.inf, -math.inf, math.nan),
        "text": "naïve ✓",
        "raw": b"\x00\xffbytes",
        "int_keys": {0: "a", 1: {"nested": (1, [2, (3,)])}},
        "mixed_keys": {"x": 1, 2: "two", (3, "t"): [], None: 0, 1.5: 1, False: 2},
        "tag_like": {"__tensor__": "not a tensor", "__tuple__": [1]},
        "empty": ({}, [], ()),
    }
    assert_identical(state, round_trip(state))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
     torch.int32, torch.int64, torch.bool],
)  # fmt: skip
def test_tensors_of_every_dtype_round_trip_bitwise(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    full = (torch.randn(3, 5, generator=generator) * 100).to(dtype)
    state = {
        "full": full,
        "scalar": full[1, 2].clone(),
        "empty": torch.empty(0, 4, dtype=dtype),
        "transposed": full.t(),
        "view_of_same_storage": full[1:],
    }
    assert_identical(state, round_trip(state))


_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
_tensors = st.builds(
    lambda values, dtype, scalar: (torch.tensor(values[0]) if scalar else torch.tensor(values)).to(dtype),
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=4),
    st.sampled_from(_DTYPES),
    st.booleans(),
)
_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary() | _tensors
_states = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(_states)
def test_any_nested_state_round_trips_exactly(state: object) -> None:
    assert_identical(state, round_trip(state))


def test_nan_payload_and_negative_zero_tensors_survive() -> None:
    special = torch.tensor([math.nan, -0.0, math.inf, -math.inf, 1e-45], dtype=torch.float32)
    assert_identical({"t": special}, round_trip({"t": special}))


def test_numpy_and_python_rng_states_round_trip() -> None:
    state = {
        "numpy": np.random.RandomState(3).get_state(),
        "python": random.Random(4).getstate(),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.int64(7),
    }
    restored = round_trip(state)
    assert_identical(state, restored)
    generator = np.random.RandomState()
    generator.set_state(restored["numpy"])
    expected = np.random.RandomState(3).randint(0, 2**31, size=5)
    assert generator.randint(0, 2**31, size=5).tolist() == expected.tolist()


def test_adamw_state_dict_round_trip_resumes_bitwise() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    restored = round_trip(saved)
    assert_identical(saved, restored)
    assert list(restored["optimizer"]["state"]) == [0, 1]
    assert restored["optimizer"]["state"][0]["step"].dim() == 0
    assert isinstance(restored["optimizer"]["param_groups"][0]["betas"], tuple)

    # The restored state continues training exactly like the original.
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=0.01)
    twin_optimizer.load_state_dict(restored["optimizer"])
    batch = torch.randn(2, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        net(batch).pow(2).sum().backward()
        opt.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_json_side_is_standard_json() -> None:
    _, structure = flatten({"a": math.nan, "b": math.inf, "c": -math.inf})
    text = dumps_json(structure).decode()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))
    assert "NaN" not in text and "Infinity" not in text


def test_non_standard_json_tokens_are_rejected() -> None:
    with pytest.raises(CheckpointError, match="where-it-is"):
        loads_json(b'{"a": NaN}', where="where-it-is")


def test_unsupported_value_names_its_path() -> None:
    with pytest.raises(CheckpointError, match=r"components\['opt'\]\.hooks\.0.*function"):
        flatten({"hooks": [lambda: 0]}, where="components['opt']")
    with pytest.raises(CheckpointError, match=r"state\.hooks\.0"):
        snapshot({"hooks": [object()]})


def test_malformed_structure_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="not in the file"):
        unflatten({"w": {"__tensor__": "missing"}}, {})
    with pytest.raises(CheckpointError, match="malformed"):
        unflatten({"__tuple__": [1], "__tensor__": "x"}, {})


def test_snapshot_copies_tensors_and_arrays() -> None:
    weights = torch.ones(3)
    array = np.ones(2)
    copy = snapshot({"w": weights, "nested": [(array, 1.5)]})
    weights.add_(1)
    array += 1
    assert torch.equal(copy["w"], torch.ones(3))
    assert copy["nested"][0][0].tolist() == [1.0, 1.0]
    assert isinstance(copy["nested"][0], tuple)
