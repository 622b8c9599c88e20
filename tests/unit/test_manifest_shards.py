"""Sharded checkpoints on real files, in one process: the save protocol, the manifest's ``shards/`` entries
(verified like top-level files), exact round trips through torch.distributed.checkpoint's safetensors
storage, and what a damaged or planted shard does."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file

import steadyfit.checkpoint.sharded
from steadyfit.checkpoint import CheckpointError, CheckpointStore
from steadyfit.checkpoint.atomic import FileRecord
from steadyfit.checkpoint.sharded import join_state, load_shards, read_shards, save_sharded, split_state
from steadyfit.checkpoint.store import seal_shards
from steadyfit.distributed import Distributed

SHARD = "shard-00001-model-00001-of-00001.safetensors"
ONE_PROCESS = Distributed("none", 0, 0, 1)


def trained(seed: int, optimizer: str = "adamw") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and its optimizer after two steps (so the optimizer holds state), from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=0.01 * seed, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * seed)
    for _ in range(2):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(store: CheckpointStore, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> Path:
    tensors, structure = split_state(model.state_dict(), opt.state_dict())
    components = {"state": {"optimizer": structure, "step": step}}
    return save_sharded(store, ONE_PROCESS, step, tensors, components, extra_files={"config.yaml": b"a: 1\n"})


def load_into(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """What a resume does with a verified sharded checkpoint: targets from the live objects, DCP, join."""
    checkpoint = CheckpointStore(path.parents[1]).open(path)
    assert checkpoint.shards_dir == path / "shards" and checkpoint.model_state == {}
    tensors, _ = split_state(model.state_dict(), opt.state_dict())
    read_shards(checkpoint.shards_dir, tensors)
    model_state, optimizer_state = join_state(tensors, checkpoint.components["state"]["optimizer"])
    model.load_state_dict(model_state)
    opt.load_state_dict(optimizer_state)


def xxh3_hex(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def assert_same_state(a: dict, b: dict) -> None:
    assert json.dumps(a, default=repr, sort_keys=True) == json.dumps(b, default=repr, sort_keys=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_sharded_checkpoint_loads_back_bitwise(tmp_path, optimizer):
    # SGD without momentum keeps no per-parameter state at all: only the model goes through the shards.
    store = CheckpointStore(tmp_path)
    model, opt = trained(1, optimizer)
    path = save(store, 3, model, opt)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["model"] == "shards"
    assert sorted(manifest["files"]) == ["config.yaml", f"shards/{SHARD}", "state.json"]
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "manifest.json", "shards", "state.json"]
    assert store.verify(path) == []

    other_model, other_opt = trained(2, optimizer)
    load_into(path, other_model, other_opt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], tensor), name
    expected, loaded = opt.state_dict(), other_opt.state_dict()
    assert expected["param_groups"] == loaded["param_groups"]
    assert expected["state"].keys() == loaded["state"].keys()
    for index, moments in expected["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)


def test_a_flipped_byte_in_a_shard_is_named_and_the_previous_checkpoint_is_the_good_one(tmp_path):
    store = CheckpointStore(tmp_path)
    first = save(store, 1, *trained(1))
    second = save(store, 2, *trained(2))
    shard = second / "shards" / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    faults = [f"xxh3_128 mismatch for file shards/{SHARD} (content changed or corrupted)"]
    assert store.verify(second) == faults
    assert store.latest_good() == (first, [(second, faults)])
    with pytest.raises(CheckpointError, match=f"{second} failed verification: xxh3_128 mismatch"):
        store.open(second)


def replace_with_link(path: Path) -> None:
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize(
    ("plant", "fault"),
    [
        (lambda p: (p / "shards" / "extra.safetensors").write_bytes(b"x"), "unexpected file shards/extra"),
        (lambda p: (p / "shards" / "deeper").mkdir(), "unexpected non-file entry shards/deeper"),
        (lambda p: (p / "shards" / "link").symlink_to(p / "state.json"), "symlink shards/link"),
        (lambda p: replace_with_link(p / "shards" / SHARD), f"symlink shards/{SHARD}"),
        (lambda p: (p / "shards" / SHARD).unlink(), f"missing file shards/{SHARD}"),
        (lambda p: os.truncate(p / "shards" / SHARD, 10), f"size mismatch for file shards/{SHARD}"),
        (lambda p: replace_with_link(p / "shards"), "shards is not a directory"),
    ],
)
def test_planted_entries_in_shards_are_faults(tmp_path, plant, fault):
    store = CheckpointStore(tmp_path / "run")
    path = save(store, 1, *trained(1))
    plant(path)
    assert any(message.startswith(fault) for message in store.verify(path)), store.verify(path)


def test_a_rank_outside_a_shards_share_still_sees_it_missing_or_resized(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1, *trained(1))
    shard = path / "shards" / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    # Not hashed by rank 1 of 2: the one shard is rank 0's share, whose verdict every rank hears before any
    # shard is read (CheckpointManager pools them).
    assert store.open(path, shard_share=(1, 2)).shards_dir == path / "shards"
    with pytest.raises(CheckpointError, match=f"xxh3_128 mismatch for file shards/{SHARD}"):
        store.open(path, shard_share=(0, 2))
    os.truncate(shard, 10)
    with pytest.raises(CheckpointError, match=f"size mismatch for file shards/{SHARD}"):
        store.open(path, shard_share=(1, 2))


@pytest.mark.parametrize(
    ("name", "sharded"),
    [
        ("shards/../state.json", True),
        ("other/x.safetensors", True),
        ("shards/x.json", True),
        (f"shards/{SHARD}", False),
    ],
)
def test_the_manifest_lists_only_shard_files_of_a_sharded_checkpoint(tmp_path, name, sharded):
    store = CheckpointStore(tmp_path)
    path = save(store, 1, *trained(1)) if sharded else store.save(1, {"w": torch.ones(1)}, {})
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
    assert f"bad name in manifest: {name!r} (must be a plain file name)" in store.verify(path)


def test_a_full_checkpoint_keeps_its_layout_and_refuses_a_shards_directory(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.save(1, {"w": torch.ones(1)}, {"state": {"step": 1}})
    assert json.loads((path / "manifest.json").read_text())["model"] == "model.safetensors"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "state.json"]
    (path / "shards").mkdir()
    assert store.verify(path) == ["unexpected non-file entry shards"]


def test_load_points_a_sharded_checkpoint_to_its_loader(tmp_path):
    store = CheckpointStore(tmp_path)
    path = save(store, 1, *trained(1))
    with pytest.raises(CheckpointError, match=f"{path} is sharded .*resume it with strategy=fsdp"):
        store.load(path)


def test_a_failed_shard_write_commits_nothing(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    good = save(store, 1, *trained(1))

    def write_half_then_fail(shards_dir: Path, tensors: dict) -> None:
        (shards_dir / SHARD).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(steadyfit.checkpoint.sharded, "write_shards", write_half_then_fail)
    with pytest.raises(CheckpointError, match=r"step-00000002: rank 0: .*No space left on device"):
        save(store, 2, *trained(2))
    assert store.list_checkpoints() == [good]
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == [good.name], "no temporary leftovers"


def test_a_commit_refuses_foreign_entries_in_shards(tmp_path):
    store = CheckpointStore(tmp_path)
    tmp = store.begin_sharded(4)
    save_file({"w": torch.ones(2)}, tmp / "shards" / SHARD)
    records = seal_shards(tmp / "shards", [SHARD])
    (tmp / "shards" / ".metadata").write_bytes(b"pickled")
    with pytest.raises(CheckpointError, match=r"unexpected entry shards/\.metadata \(no rank wrote it\)"):
        store.commit_sharded(4, tmp, {"state": {}}, shard_records=records)
    assert not tmp.exists() and store.list_checkpoints() == []


class TwoRanksSeenFromRankZero(Distributed):
    """Rank 0 of a two-rank group whose rank 1 (simulated) reports ``peer``: ``(failure, shard records)``."""

    def __init__(self, peer: tuple) -> None:
        super().__init__("fsdp", 0, 0, 2)
        self.peer = peer

    def gather_objects(self, value):
        return [value, self.peer]

    def broadcast_object(self, value):
        return value


PEER = "shard-00002-model-00001-of-00001.safetensors"


def peer_record(size: int) -> dict[str, FileRecord]:
    return {f"shards/{PEER}": FileRecord(size, "ab" * 16)}


def test_the_manifest_takes_each_ranks_own_hash_and_rank_zero_reads_no_other_shard(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    peer_bytes = b"rank 1 wrote this"
    real_write = steadyfit.checkpoint.sharded.write_shards

    def write_both(shards_dir: Path, tensors: dict) -> list[str]:
        (shards_dir / PEER).write_bytes(peer_bytes)  # rank 1's file, as a shared filesystem shows it
        return real_write(shards_dir, tensors)

    monkeypatch.setattr(steadyfit.checkpoint.sharded, "write_shards", write_both)
    model, opt = trained(1)
    tensors, _ = split_state(model.state_dict(), opt.state_dict())
    two = TwoRanksSeenFromRankZero((None, peer_record(len(peer_bytes))))
    path = save_sharded(store, two, 1, tensors, {"state": {"step": 1}})
    files = json.loads((path / "manifest.json").read_text())["files"]
    # Rank 1's record is listed as it sent it: rank 0 did not read that file (its real hash differs).
    assert files[f"shards/{PEER}"] == {"size": len(peer_bytes), "xxh3_128": "ab" * 16}
    own = path / "shards" / SHARD
    assert files[f"shards/{SHARD}"] == {"size": own.stat().st_size, "xxh3_128": xxh3_hex(own.read_bytes())}
    assert store.verify(path) == [f"xxh3_128 mismatch for file shards/{PEER} (content changed or corrupted)"]
    # On load each rank hashes its own share: rank 0 its own shard (intact), rank 1 the peer's.
    assert store.open(path, shard_share=(0, 2)).shards_dir == path / "shards"
    with pytest.raises(
        CheckpointError, match=f"failed verification: xxh3_128 mismatch for file shards/{PEER}"
    ):
        store.open(path, shard_share=(1, 2))


@pytest.mark.parametrize(
    ("peer_writes", "recorded_size", "fault"),
    [
        (False, 17, f"shards/{PEER} was written by a rank but is missing from this listing of shards/"),
        (True, 99, f"shards/{PEER} is 17 bytes here but its rank wrote 99 bytes"),
    ],
)
def test_a_listing_that_disagrees_with_the_ranks_records_commits_nothing(
    tmp_path, monkeypatch, peer_writes, recorded_size, fault
):
    # A stale listing of a shared filesystem: rank 0 must not commit a manifest without rank 1's shard.
    store = CheckpointStore(tmp_path)
    good = save(store, 1, *trained(1))
    real_write = steadyfit.checkpoint.sharded.write_shards

    def write(shards_dir: Path, tensors: dict) -> list[str]:
        if peer_writes:
            (shards_dir / PEER).write_bytes(b"x" * 17)
        return real_write(shards_dir, tensors)

    monkeypatch.setattr(steadyfit.checkpoint.sharded, "write_shards", write)
    model, opt = trained(2)
    tensors, _ = split_state(model.state_dict(), opt.state_dict())
    two = TwoRanksSeenFromRankZero((None, peer_record(recorded_size)))
    with pytest.raises(CheckpointError, match=re.escape(fault)):
        save_sharded(store, two, 2, tensors, {"state": {"step": 2}})
    assert sorted(p.name for p in store.checkpoints_dir.iterdir()) == [good.name], "nothing committed"


def test_a_rank_that_wrote_nothing_sends_no_record(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    model, opt = trained(1)
    tensors, _ = split_state(model.state_dict(), opt.state_dict())
    path = save_sharded(store, TwoRanksSeenFromRankZero((None, {})), 1, tensors, {"state": {"step": 1}})
    assert store.verify(path) == []
    assert sorted(p.name for p in (path / "shards").iterdir()) == [SHARD]


def test_a_failing_rotation_after_the_commit_does_not_fail_the_save(tmp_path, capsys):
    store = CheckpointStore(tmp_path)
    model, opt = trained(1)
    tensors, _ = split_state(model.state_dict(), opt.state_dict())

    def rotate(path: Path) -> None:
        raise OSError(13, "Permission denied")

    path = save_sharded(store, ONE_PROCESS, 1, tensors, {"state": {"step": 1}}, on_commit=rotate)
    assert store.list_checkpoints() == [path] and store.verify(path) == []
    warning = capsys.readouterr().err
    assert f"warning: checkpoint {path} is committed, but what followed its commit failed" in warning
    assert "Permission denied" in warning


class WithUnusedBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(3, 2)
        self.unused = torch.nn.Linear(3, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.used(inputs)


def test_a_resume_loads_an_optimizer_without_state_for_an_unused_parameter(tmp_path):
    torch.manual_seed(0)
    model = WithUnusedBranch()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, structure = split_state(*ONE_PROCESS.sharded_state(model, opt))
    path = save_sharded(
        CheckpointStore(tmp_path), ONE_PROCESS, 2, tensors, {"state": {"optimizer": structure}}
    )
    assert not any(name.startswith("optimizer.state.unused.") for name in tensors)

    torch.manual_seed(1)
    resumed = WithUnusedBranch()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.01)
    load_shards(ONE_PROCESS, path / "shards", resumed, resumed_opt, structure)
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    expected, loaded = opt.state_dict(), resumed_opt.state_dict()
    assert expected["param_groups"] == loaded["param_groups"]
    assert loaded["state"].keys() == expected["state"].keys() == {0, 1}, "no state for the unused branch"
    for index, moments in expected["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
