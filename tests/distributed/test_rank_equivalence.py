"""Guarantees 8, 6, 1 and 7 across ranks: 2 ranks (real torchrun, gloo) with batch B equal 1 rank with 2B.

One launch trains every 2-rank run of this file, one after another; the 1-rank references train in this
process. The training set (33 samples) and the eval set (25) are not multiples of the global batch, so the
last global micro-batch leaves rank 1 an empty share: its stand-in sample must weigh exactly nothing.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from dist_harness import (
    assert_close,
    environment,
    printed,
    results,
    run_to_end,
    script,
    torchrun,
)
from dist_script import build_trainer

from helpers import final_weights, metric_rows
from steadyfit import ConfigError

pytestmark = pytest.mark.slow

# name -> overrides of the 2-rank run; batch_size is per rank.
RUNS = {
    "ddp": {},
    "fsdp": {"strategy": "fsdp", "save_every": 3, "keep_last": 5},
    "ddp_pair": {"loss": "pair", "batch_size": 2, "grad_accum_steps": 2},
    "fsdp_pair": {"loss": "pair", "batch_size": 2, "grad_accum_steps": 2, "strategy": "fsdp"},
    "nan": {"nan_at": 3},
    "nan_fsdp": {"nan_at": 3, "strategy": "fsdp"},
    # Fused AdamW: the non-finite check stays on the device and steps are booked at read points (every 4).
    "ddp_adamw": {"optimizer": "adamw", "lr": 0.01, "log_every": 4},
    "nan_adamw": {"optimizer": "adamw", "lr": 0.01, "log_every": 4, "nan_at": 3},
    # A stop asked for by an on_log callback, which only rank 0 runs: every rank stops at the same step.
    "stop_on_log": {"stop_on_log_at": 3},
    # Data through a worker per rank, the eval loader's kept from one evaluation to the next.
    "ddp_kept_eval": {"num_workers": 1, "persistent_workers": True, "eval_every": 2},
    "ddp_fresh_eval": {"num_workers": 1, "eval_every": 2},
    # Micro-batches cut into pieces of one sample: the last global micro-batch (3 of the 33 samples) gives
    # rank 0 two samples and rank 1 one, yet both must run two pieces (FSDP all-gathers in each).
    "ddp_micro": {"batch_size": 3, "micro_batch_size": 1},
    "fsdp_micro": {"batch_size": 3, "micro_batch_size": 1, "strategy": "fsdp"},
    "eval_mean": {"mode": "evaluate", "eval_batch_size": 4},
    "eval_pair": {"mode": "evaluate", "loss": "pair", "eval_batch_size": 3},
}
# Every schedule, its warm-up from warmup_ratio, with accumulation: the horizon (steps per epoch, total
# steps, warm-up, decay phases) must come from the global batch, 2 x 2 x 2 = 8 here as on one rank.
SCHEDULES = ("constant", "linear", "cosine", "step", "onecycle", "wsd")
SCHEDULE = {
    "optimizer": "adamw",
    "lr": 0.05,
    "warmup_ratio": 0.2,
    "step_size": 2,
    "gamma": 0.5,
    "min_lr_ratio": 0.1,
    "batch_size": 2,
    "grad_accum_steps": 2,
}
RUNS.update({f"schedule_{name}": {**SCHEDULE, "scheduler": name} for name in SCHEDULES})
# The 1-rank run each 2-rank run must equal: the same global batch on one process.
ONE_RANK = {"batch_size": 8}
ONE_RANK_ADAMW = {"batch_size": 8, "optimizer": "adamw", "lr": 0.01, "log_every": 4}
ONE_RANK_PAIR = {"loss": "pair", "batch_size": 4, "grad_accum_steps": 2}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every 2-rank run of RUNS in one launch: (base directory, results by run name and rank)."""
    base = tmp_path_factory.mktemp("two_ranks")
    output = run_to_end(torchrun(*script(*((base / name, overrides) for name, overrides in RUNS.items()))))
    by_rank = results(output)
    assert sorted(by_rank) == [0, 1] and all(len(runs) == len(RUNS) for runs in by_rank.values()), output
    return base, {name: (by_rank[0][i], by_rank[1][i]) for i, name in enumerate(RUNS)}


def one_rank(run_dir, overrides):
    """The 1-rank reference, trained in this process; returns (result, trainer)."""
    trainer, _ = build_trainer(str(run_dir), overrides)
    return trainer.fit(), trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_rank") / "run"
    one_rank(run_dir, ONE_RANK)
    return run_dir


@pytest.fixture(scope="module")
def reference_pair(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_rank_pair") / "run"
    one_rank(run_dir, ONE_RANK_PAIR)
    return run_dir


@pytest.mark.parametrize("name", ["ddp", "fsdp", "ddp_kept_eval"])
def test_two_ranks_equal_one_rank_with_the_doubled_batch(two_ranks, reference, name):
    base, _ = two_ranks
    assert_close(final_weights(base / name), final_weights(reference))


def test_device_side_checks_under_ddp_equal_one_rank(two_ranks, tmp_path):
    base, runs = two_ranks
    clean, trainer = one_rank(tmp_path / "adamw", ONE_RANK_ADAMW)
    assert trainer.device_skip is not None
    assert_close(final_weights(base / "ddp_adamw"), final_weights(tmp_path / "adamw"))
    # NaN on rank 1 only: both ranks skip that step, booked at the next read point.
    for rank_result in runs["nan_adamw"]:
        assert rank_result["nonfinite_skips"] == 1
        assert rank_result["global_step"] == clean.global_step - 1


@pytest.mark.parametrize("name", ["ddp_micro", "fsdp_micro"])
def test_micro_batches_cut_into_pieces_pair_up_across_ranks(two_ranks, tmp_path, name):
    base, _ = two_ranks
    one_rank(tmp_path / "run", {"batch_size": 6})
    assert_close(final_weights(base / name), final_weights(tmp_path / "run"))


@pytest.mark.parametrize("name", ["ddp_pair", "fsdp_pair"])
def test_accumulated_token_loss_is_normalised_over_both_ranks(two_ranks, reference_pair, name):
    # Ragged sequences: each rank holds a different token count, so a per-rank normalisation would differ.
    base, _ = two_ranks
    assert_close(final_weights(base / name), final_weights(reference_pair))


@pytest.mark.parametrize("name", ["eval_mean", "eval_pair"])
def test_eval_metrics_are_exact_over_the_whole_set_and_every_rank(two_ranks, tmp_path, name):
    _, runs = two_ranks
    assert runs[name][0]["metrics"] == runs[name][1]["metrics"], "ranks disagree on the reduced metrics"
    for eval_batch_size in (25, 7):
        overrides = {**RUNS[name], "eval_batch_size": eval_batch_size}
        trainer, _ = build_trainer(str(tmp_path / f"eval{eval_batch_size}"), overrides)
        expected = trainer.evaluate()
        measured = runs[name][0]["metrics"]
        assert measured.keys() == expected.keys()
        for key, value in expected.items():
            assert measured[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_kept_eval_workers_score_every_evaluation_as_fresh_ones_under_two_ranks(two_ranks):
    base, _ = two_ranks
    kept, fresh = (
        [row for row in metric_rows(base / name) if "eval_loss" in row]
        for name in ("ddp_kept_eval", "ddp_fresh_eval")
    )
    assert len(kept) > 2
    assert [(row["step"], row["eval_loss"]) for row in kept] == [
        (row["step"], row["eval_loss"]) for row in fresh
    ]


def test_the_logged_train_loss_is_the_mean_over_both_ranks(two_ranks, reference):
    base, runs = two_ranks
    rows = [row for row in metric_rows(base / "ddp") if row["kind"] == "train"]
    expected = [row for row in metric_rows(reference) if row["kind"] == "train"]
    assert [row["step"] for row in rows] == [row["step"] for row in expected] == list(range(1, 11))
    for row, one in zip(rows, expected, strict=True):
        assert row["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert runs["ddp"][0]["metrics"] == runs["ddp"][1]["metrics"], "ranks disagree on the reduced metrics"


def test_rank_zero_alone_writes_the_run_directory(two_ranks):
    base, _ = two_ranks
    run_dir = base / "ddp"
    assert sorted(path.name for path in run_dir.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "final",
        "metrics.jsonl",
    ]
    assert sorted(path.name for path in (run_dir / "final").iterdir()) == ["model.safetensors"]
    rows = metric_rows(run_dir)
    # A second writer would duplicate rows (its own time_s) or tear lines; one row per logged step.
    keys = [(row["kind"], row["step"]) for row in rows]
    assert len(keys) == len(set(keys))
    assert [step for kind, step in keys if kind == "train"] == list(range(1, 11))
    assert [kind for kind, _ in keys].count("summary") == 1
    # One start row, from rank 0, with the global numbers; FSDP counts whole parameters, not one shard.
    start = rows[0]
    assert start["kind"] == "start" and [kind for kind, _ in keys].count("start") == 1
    assert start["world_size"] == 2 and start["effective_batch"] == 2 * start["batch_size"]
    assert metric_rows(base / "fsdp")[0]["parameters"] == start["parameters"]


@pytest.mark.parametrize("name", ["nan", "nan_fsdp"])
def test_nan_on_one_rank_skips_the_step_on_both(two_ranks, tmp_path, name):
    _, runs = two_ranks
    clean, _ = one_rank(tmp_path / "clean", ONE_RANK)
    for rank_result in runs[name]:
        assert rank_result["nonfinite_skips"] == 1
        assert rank_result["global_step"] == clean.global_step - 1


def test_a_stop_from_on_log_stops_every_rank_at_the_same_step(two_ranks):
    _, runs = two_ranks
    assert [rank_result["global_step"] for rank_result in runs["stop_on_log"]] == [3, 3]


def test_ddp_refuses_to_resume_on_another_world_size(two_ranks, tmp_path):
    base, _ = two_ranks
    run_dir = tmp_path / "copy"
    shutil.copytree(base / "ddp", run_dir)
    trainer, _ = build_trainer(str(run_dir), ONE_RANK)
    with pytest.raises(
        ConfigError, match=r"world size: 2 rank\(s\) in the checkpoint, 1 now \(only strategy=fsdp"
    ):
        trainer.fit()


def test_fsdp_resumes_on_one_rank_with_the_same_global_batch(two_ranks, reference, tmp_path):
    base, _ = two_ranks
    run_dir = tmp_path / "copy"
    shutil.copytree(base / "fsdp", run_dir)
    shutil.rmtree(run_dir / "final")
    for checkpoint in (run_dir / "checkpoints").iterdir():
        if checkpoint.name != "step-00000003":
            shutil.rmtree(checkpoint)
    overrides = {**RUNS["fsdp"], **ONE_RANK}
    output = run_to_end(torchrun(*script((run_dir, overrides)), nproc=1))
    steps = [int(step) for rank, step in printed(output, "step")]
    assert steps == list(range(4, 11)), "it must continue from step 3 (mid-epoch), not start over"
    # Resharded: the same samples per step, other reduction orders; equal to float rounding, not bitwise.
    assert_close(final_weights(run_dir), final_weights(reference))


def test_a_checkpoint_that_is_not_sharded_is_refused_by_fsdp_naming_the_strategy(reference, tmp_path):
    # A healthy checkpoint of one process (or DDP) is no damage: the run must say which strategy to use,
    # not call every checkpoint damaged and ask to move them away.
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "final")
    command = torchrun(*script((run_dir, {**ONE_RANK, "strategy": "fsdp", "max_epochs": 3})), nproc=1)
    completed = subprocess.run(
        command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "strategy: the checkpoint is not sharded" in completed.stdout, completed.stdout
    assert "damaged" not in completed.stdout


def _train_rows(run_dir):
    return [row for row in metric_rows(run_dir) if row["kind"] == "train"]


@pytest.mark.parametrize("scheduler", SCHEDULES)
def test_every_schedule_runs_over_the_global_horizon(two_ranks, tmp_path, scheduler):
    base, runs = two_ranks
    one = {**SCHEDULE, "scheduler": scheduler, "batch_size": 4}
    result, trainer = one_rank(tmp_path / "one", one)
    assert trainer.horizons.total_steps == result.global_step == 10
    assert runs[f"schedule_{scheduler}"][0]["global_step"] == 10
    assert_close(final_weights(base / f"schedule_{scheduler}"), final_weights(tmp_path / "one"))
    two_rows, one_rows = _train_rows(base / f"schedule_{scheduler}"), _train_rows(tmp_path / "one")
    assert [row["step"] for row in two_rows] == [row["step"] for row in one_rows] == list(range(1, 11))
    assert [row["lr"] for row in two_rows] == [row["lr"] for row in one_rows], "the lr, step by step"


def test_three_ranks_plan_the_horizon_of_one(tmp_path):
    """World size 3 (33 samples, global micro-batch 6): cosine with warmup_ratio over the same 6 steps."""
    overrides = {**SCHEDULE, "scheduler": "cosine", "batch_size": 2, "max_epochs": 2}
    output = run_to_end(torchrun(*script((tmp_path / "three", overrides)), nproc=3))
    assert [run[0]["global_step"] for run in results(output).values()] == [6, 6, 6]
    one_result, trainer = one_rank(tmp_path / "one", {**overrides, "batch_size": 6})
    assert trainer.horizons.total_steps == one_result.global_step == 6
    assert_close(final_weights(tmp_path / "three"), final_weights(tmp_path / "one"))
    assert [row["lr"] for row in _train_rows(tmp_path / "three")] == [
        row["lr"] for row in _train_rows(tmp_path / "one")
    ]
