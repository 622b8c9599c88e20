"""Guarantees 2 and 4 across ranks with real torchrun groups: a SIGKILLed worker under --max-restarts, and a
SIGTERM or SIGINT reaching one worker, both end in weights bitwise equal to the uninterrupted 2-rank run."""

from __future__ import annotations

import signal

import pytest
from dist_harness import (
    assert_close,
    kill_rank_one_after_commit,
    preempt_one_rank,
    printed,
    results,
    run_to_end,
    script,
    torchrun,
)
from test_rank_equivalence import SCHEDULE, one_rank

from helpers import assert_bitwise_equal, final_weights, metric_rows

pytestmark = pytest.mark.slow

# Dropout draws from each rank's own RNG stream, so a resume that restored the wrong rank's stream would show.
# The checkpoints: the best eval at each epoch end (steps 5, 10, 15) and the preemption's.
OVERRIDES = {"dropout": 0.2, "deterministic": True, "max_epochs": 3, "optimizer": "adamw", "lr": 0.01}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two uninterrupted 2-rank runs agree bitwise, or no test here would prove anything."""
    base = tmp_path_factory.mktemp("uninterrupted")
    for name in ("a", "b"):
        output = run_to_end(torchrun(*script((base / name, OVERRIDES))))
        assert results(output)[0][0]["global_step"] == 15
    first, second = final_weights(base / "a"), final_weights(base / "b")
    assert_bitwise_equal(first, second)
    return first


def test_a_sigkilled_worker_restarts_and_finishes_bitwise_equal(reference, tmp_path):
    run_dir = tmp_path / "run"
    output = kill_rank_one_after_commit(run_dir, {**OVERRIDES, "save_every": 5}, step=5)
    pids = [int(pid) for rank, pid in printed(output, "pid")]
    assert len(pids) == 4, "torchrun must have restarted both workers once"
    restarted = output[output.rindex("pid ") :]
    first_step = min(int(step) for rank, step in printed(restarted, "step"))
    assert first_step > 5, "the restarted group must resume from a checkpoint, not from step 0"
    assert_bitwise_equal(final_weights(run_dir), reference)


def test_sigterm_to_one_worker_checkpoints_both_at_one_step_and_resumes(reference, tmp_path):
    run_dir = tmp_path / "run"
    output = preempt_one_rank(run_dir, OVERRIDES, rank=1, cue="step 1 1")
    last_steps = {int(rank): int(step) for rank, step in printed(output, "step")}
    assert last_steps[0] == last_steps[1] < 5, (
        "both ranks stop at the same step boundary, before any other save"
    )
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == [f"step-{last_steps[0]:08d}"]
    assert (checkpoints[0] / "manifest.json").is_file()

    output = run_to_end(torchrun(*script((run_dir, OVERRIDES))))
    assert min(int(step) for rank, step in printed(output, "step")) == last_steps[0] + 1
    assert_bitwise_equal(final_weights(run_dir), reference)


def test_a_user_loader_preempted_mid_epoch_resumes_bitwise_on_every_rank(tmp_path):
    # The user's DataLoader (a shuffling DistributedSampler) draws its base seed from each rank's torch
    # stream as every epoch starts: a resume mid-epoch must replay those draws, not shift the dropout after.
    overrides = {**OVERRIDES, "user_loader": 1}
    run_to_end(torchrun(*script((tmp_path / "uninterrupted", overrides))))
    run_dir = tmp_path / "run"
    # SIGINT (Ctrl-C in rank 1's terminal) rather than SIGTERM: rank 0, which got no signal, exits 130 too.
    output = preempt_one_rank(run_dir, overrides, rank=1, cue="step 1 6", signum=signal.SIGINT)
    stopped = int(printed(output, "step")[-1][1])
    assert stopped % 5, "stopped in the middle of an epoch (5 steps each)"
    run_to_end(torchrun(*script((run_dir, overrides))))
    assert_bitwise_equal(final_weights(run_dir), final_weights(tmp_path / "uninterrupted"))


def test_a_preempted_two_rank_run_with_a_decaying_schedule_resumes_to_one_rank(tmp_path):
    """SIGTERM between save points under 2 ranks with warm-up, cosine and accumulation; the resumed group
    ends where one rank with the same global batch does, with the same lr at every step."""
    overrides = {**SCHEDULE, "scheduler": "cosine", "max_epochs": 3, "save_every": 4, "log_every": 3}
    run_dir = tmp_path / "two"
    preempt_one_rank(run_dir, overrides, rank=0, cue="step 1 6")
    run_to_end(torchrun(*script((run_dir, overrides))))
    one_rank(tmp_path / "one", {**overrides, "batch_size": 4})
    assert_close(final_weights(run_dir), final_weights(tmp_path / "one"))
    lrs = [
        [row["lr"] for row in metric_rows(d) if row["kind"] == "train"] for d in (run_dir, tmp_path / "one")
    ]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 5
