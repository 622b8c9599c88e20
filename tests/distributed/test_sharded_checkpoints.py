"""Sharded FSDP checkpoints with real torchrun groups: each rank writes its own safetensors shard through
torch.distributed.checkpoint, nothing is pickled, a SIGKILLed group resumes bitwise equal, and a damaged
shard is reported and skipped for the previous good checkpoint, and load_best_at_end loads a sharded best
checkpoint into full final weights. (Resharding 2 ranks -> 1 is
test_rank_equivalence.py's test_fsdp_resumes_on_one_rank_with_the_same_global_batch.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import (
    kill_rank_one_after_commit,
    printed,
    results,
    run_to_end,
    script,
    torchrun,
)
from safetensors.torch import load_file

from helpers import assert_bitwise_equal, final_weights, metric_rows
from steadyfit.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow

# Dropout draws from each rank's own RNG stream and AdamW keeps per-parameter moments (sharded) and step
# counts (replicated): a resume that mixed up any of them would not be bitwise equal. The unused branch
# gets no gradient, so AdamW keeps no state for it: a resume must load such an optimizer state as it is.
# Checkpoints: every 5 steps, and the best evaluation at each epoch end (5, 10, 15), written right away.
OVERRIDES = {
    "strategy": "fsdp",
    "unused_branch": 1,
    "dropout": 0.2,
    "deterministic": True,
    "max_epochs": 3,
    "optimizer": "adamw",
    "lr": 0.01,
    "save_every": 5,
}
SHARDS = ["shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
# "Best" is the highest eval loss, an early checkpoint: loading it at the end must change the weights.
WORST_IS_BEST = {
    **OVERRIDES,
    "load_best_at_end": True,
    "metric_for_best": "eval_loss",
    "greater_is_better": True,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two uninterrupted 2-rank FSDP runs and one with load_best_at_end, in one launch: the base directory."""
    base = tmp_path_factory.mktemp("uninterrupted")
    runs = (
        (base / "a", OVERRIDES),
        (base / "b", OVERRIDES),
        (base / "best", WORST_IS_BEST),
        (base / "full_disk", {**OVERRIDES, "fail_write_on_rank": 1}),
    )
    output = run_to_end(torchrun(*script(*runs)))
    by_rank = results(output)
    assert [run.get("global_step") for run in by_rank[0]] == [15, 15, 15, None], output
    return base, {rank: runs[-1] for rank, runs in by_rank.items()}


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """The final weights of the uninterrupted run; two such runs agree bitwise, or no test here would prove
    anything."""
    base, _ = uninterrupted
    first = final_weights(base / "a")
    assert_bitwise_equal(first, final_weights(base / "b"))
    return first


def weights_in_shards(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full weights of a 2-rank sharded checkpoint, from its shard files alone: FSDP2 splits dim 0 in
    rank order, and each shard file is plain safetensors."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name in SHARDS:
        for key, tensor in load_file(checkpoint / "shards" / name).items():
            if key.startswith("model."):
                parts.setdefault(key.removeprefix("model."), []).append(tensor)
    return {key: torch.cat(chunks) for key, chunks in parts.items()}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A 2-rank FSDP run whose rank 1 is SIGKILLed after the step-5 commit, restarted by torchrun; the
    restarted workers refuse to unpickle anything. Returns (run_dir, output)."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    output = kill_rank_one_after_commit(run_dir, {**OVERRIDES, "forbid_pickle": 1}, step=5)
    return run_dir, output


def test_each_rank_writes_its_own_shard_and_nothing_is_pickled(killed):
    run_dir, _ = killed
    checkpoints = CheckpointStore(run_dir).list_checkpoints()
    assert [path.name for path in checkpoints] == ["step-00000005", "step-00000010", "step-00000015"]
    for checkpoint in checkpoints:
        assert sorted(path.name for path in checkpoint.iterdir()) == [
            "config.yaml",
            "manifest.json",
            "shards",
            "state.json",
            "state.safetensors",
        ], "no model.safetensors gathered on rank 0, no DCP .metadata pickle"
        assert sorted(path.name for path in (checkpoint / "shards").iterdir()) == SHARDS
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        assert manifest["model"] == "shards"
        assert {f"shards/{name}" for name in SHARDS} <= manifest["files"].keys()
        assert CheckpointStore(run_dir).verify(checkpoint) == []


def test_a_sigkilled_fsdp_group_resumes_bitwise_equal_without_unpickling(reference, killed):
    run_dir, output = killed
    assert len(printed(output, "pid")) == 4, "torchrun must have restarted both workers once"
    restarted = output[output.rindex("pid ") :]
    first_step = min(int(step) for rank, step in printed(restarted, "step"))
    assert first_step > 5, "the restarted group must resume from a checkpoint, not from step 0"
    # The restarted workers ran with pickle.load/loads and torch.load raising: the load never needed them.
    assert_bitwise_equal(final_weights(run_dir), reference)


def test_load_best_at_end_loads_the_best_sharded_checkpoint_into_full_final_weights(uninterrupted, reference):
    base, _ = uninterrupted
    run_dir = base / "best"
    evals = [row for row in metric_rows(run_dir) if row["kind"] == "eval"]
    best_step = max(evals, key=lambda row: row["eval_loss"])["step"]
    assert best_step < 15, "the best checkpoint must not be the last step, or loading it would prove nothing"
    best = weights_in_shards(run_dir / "checkpoints" / f"step-{best_step:08d}")
    assert_bitwise_equal(final_weights(run_dir), best)
    assert any(not torch.equal(best[key], reference[key]) for key in best)


def test_a_shard_write_failing_on_one_rank_fails_the_save_on_both_and_commits_nothing(uninterrupted):
    base, failed = uninterrupted
    # Both ranks left fit() with the error (neither waits in a collective: the launch went on to its end).
    for rank in (0, 1):
        assert failed[rank]["error"].startswith(
            f"could not save sharded checkpoint {base / 'full_disk' / 'checkpoints' / 'step-00000005'}: "
            "rank 1: [Errno 28] No space left on device"
        ), failed[rank]
    assert list((base / "full_disk" / "checkpoints").iterdir()) == [], "no step-… and no temporary leftovers"


def test_a_damaged_shard_is_reported_and_the_previous_checkpoint_resumes(reference, killed, tmp_path):
    source, _ = killed
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "final")
    shard = run_dir / "checkpoints" / "step-00000015" / "shards" / SHARDS[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data: the file still parses, only the hash can tell
    shard.write_bytes(bytes(data))
    faults = CheckpointStore(run_dir).verify(shard.parents[1])
    assert faults == [f"xxh3_128 mismatch for file shards/{SHARDS[1]} (content changed or corrupted)"]

    output = run_to_end(torchrun(*script((run_dir, OVERRIDES))))
    assert f"skipping damaged checkpoint {shard.parents[1]}: {faults[0]}" in output
    assert min(int(step) for rank, step in printed(output, "step")) == 11, "resumed from step 10"
    assert_bitwise_equal(final_weights(run_dir), reference)
