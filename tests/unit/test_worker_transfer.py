"""Batches from DataLoader workers: small tensors travel by value, large ones through torch's shared memory,
and the training process gets the same values, dtypes, shapes and containers either way."""

from __future__ import annotations

import collections
from multiprocessing.reduction import ForkingPickler  # torch's import adds its shared-memory reducers

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset, default_collate

from helpers import base_config
from steadyfit import Trainer
from steadyfit import data as data_mod
from steadyfit.worker_transfer import BY_VALUE_MAX_BYTES, WorkerCollate, by_value

Pair = collections.namedtuple("Pair", ["inputs", "targets"])


def _sent(batch):
    """What the training process receives of ``batch`` pickled in a worker (the DataLoader's own pickler)."""
    return ForkingPickler.loads(ForkingPickler.dumps(by_value(batch)))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
    ],
)
@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (5,), (4, 3, 2)])
def test_a_small_tensor_arrives_as_it_was_sent(dtype, shape):
    source = torch.randn(shape).mul(10).to(dtype)
    received = _sent(source)
    assert type(received) is torch.Tensor
    assert received.dtype == dtype and received.shape == source.shape
    as_bytes = lambda tensor: tensor.reshape(-1).view(torch.uint8)  # noqa: E731  (exact, NaN included)
    assert torch.equal(as_bytes(received), as_bytes(source))
    assert not received.is_shared()
    as_bytes(received).add_(1)  # writable
    assert torch.equal(as_bytes(received), as_bytes(source) + 1) or not source.numel()


def test_small_tensors_travel_in_the_pickle_and_large_ones_in_shared_memory():
    small = torch.arange(BY_VALUE_MAX_BYTES // 4, dtype=torch.float32)
    large = torch.arange(BY_VALUE_MAX_BYTES // 4 + 1, dtype=torch.float32)
    assert len(ForkingPickler.dumps(by_value(small))) > small.nbytes  # the bytes themselves
    assert len(ForkingPickler.dumps(by_value(large))) < 1024  # a handle to a shared segment
    assert by_value(large) is large


def test_views_and_tensors_that_need_torchs_own_path_keep_it():
    base = torch.arange(12.0).reshape(3, 4)
    strided = base.t()
    grad = torch.ones(3, requires_grad=True)
    assert by_value(strided) is strided and by_value(grad) is grad
    row = _sent(base[1])  # a contiguous view: only its own elements travel
    assert torch.equal(row, base[1]) and row.untyped_storage().nbytes() == 16


def test_containers_keep_their_types():
    tensor = torch.arange(6).reshape(2, 3)
    batch = {
        "pair": (tensor, [tensor.float(), "a label"]),
        "named": Pair(tensor, torch.tensor([0, 1])),
        "count": 2,
    }
    received = _sent(batch)
    assert type(received) is dict and type(received["pair"]) is tuple and type(received["pair"][1]) is list
    assert type(received["named"]) is Pair and torch.equal(received["named"].targets, torch.tensor([0, 1]))
    assert received["pair"][1][1] == "a label" and received["count"] == 2
    assert torch.equal(received["pair"][0], tensor)
    assert torch.equal(batch["pair"][0], tensor)  # the worker's own batch is not changed


def test_a_transformers_batch_encoding_stays_one():
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(2, 4, dtype=torch.long)})
    received = _sent(encoding)
    assert type(received) is transformers.BatchEncoding
    assert torch.equal(received["input_ids"], encoding["input_ids"])


class TensorsOnly(dict):
    """A batch type that refuses anything but tensors (a user's own validation)."""

    def __setitem__(self, key, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a tensor")
        super().__setitem__(key, value)


def test_a_mapping_that_refuses_the_stand_ins_is_sent_as_torch_sends_it():
    batch = TensorsOnly()
    batch["x"] = torch.ones(3)
    assert by_value(batch) is batch
    received = _sent(batch)
    assert type(received) is TensorsOnly and torch.equal(received["x"], torch.ones(3))


def test_the_collate_is_torchs_default_collate_or_the_users():
    samples = [(torch.full((3,), float(i)), i, {"w": torch.tensor(i / 2)}) for i in range(4)]
    expected = default_collate(samples)
    received = ForkingPickler.loads(ForkingPickler.dumps(WorkerCollate(None)(samples)))
    assert repr(received) == repr(expected)
    mine = WorkerCollate(lambda samples: {"n": torch.tensor(len(samples))})
    assert int(ForkingPickler.loads(ForkingPickler.dumps(mine(samples)))["n"]) == 4


class Sized(Dataset):
    """Samples of a chosen size, so a batch of them falls on either side of the by-value limit."""

    def __init__(self, features: int) -> None:
        self.features = features

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((self.features,), float(index)), torch.tensor(index % 2)


@pytest.mark.parametrize("features", [2, BY_VALUE_MAX_BYTES // 4])
def test_batches_from_real_workers_equal_the_main_process_ones(tmp_path, features):
    spec = data_mod.LoaderSpec(batch_size=4, eval_batch_size=4, num_workers=2, seed=0, pin_memory=False)
    in_workers = data_mod.TrainBatches(Sized(features), spec)
    at_home = data_mod.TrainBatches(Sized(features), data_mod.LoaderSpec(**{**vars(spec), "num_workers": 0}))
    received = list(in_workers.epoch(0, start_batch=0))
    in_workers.close()
    expected = list(at_home.epoch(0, start_batch=0))
    assert len(received) == len(expected) == 2
    for (inputs, targets), (want_inputs, want_targets) in zip(received, expected, strict=True):
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
        # Small batches came by value; a batch of 4 samples of the limit's size came through shared memory.
        assert inputs.is_shared() == (inputs.nbytes > BY_VALUE_MAX_BYTES)
        assert not targets.is_shared()


def test_a_fit_with_workers_trains_what_a_fit_without_them_does(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(48, 4, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    data = TensorDataset(inputs, targets)
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        config = base_config(tmp_path / str(workers), batch_size=8, num_workers=workers, max_epochs=2)
        Trainer(model, config, train_data=data, loss_fn=F.cross_entropy).fit()
        weights.append(model.weight.detach().clone())
    assert torch.equal(*weights)
