"""Guarantees 2, 3 and 4 with real processes: kill, preempt, corrupt, then rerun the same command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from harness import (
    INT,
    KILL,
    TERM,
    run_to_end,
    run_until,
)

from helpers import assert_bitwise_equal, final_weights, metric_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two uninterrupted runs: they must agree bitwise, or no resume test would prove anything."""
    base = tmp_path_factory.mktemp("reference")
    run_to_end(base / "a")
    run_to_end(base / "b")
    first, second = final_weights(base / "a"), final_weights(base / "b")
    assert_bitwise_equal(first, second)
    return first, metric_rows(base / "a")


def _train_rows(rows):
    return [row for row in rows if row["kind"] == "train"]


@pytest.mark.parametrize("kill_after_step", [1, 4, 9, 16, 27])
def test_sigkill_anywhere_then_rerun_is_bitwise_equal(tmp_path, reference, kill_after_step):
    # Steps 3, 6, 9 ... submit a checkpoint: killing right after "step 9" lands while it is being written.
    weights, reference_rows = reference
    status, _ = run_until(tmp_path, f"step {kill_after_step}", KILL)
    assert status == -KILL
    completed = run_to_end(tmp_path)
    assert "done 39" in completed.stdout
    assert_bitwise_equal(final_weights(tmp_path), weights)
    steps = [row["step"] for row in _train_rows(metric_rows(tmp_path))]
    assert steps == sorted(set(steps)), "each step is logged exactly once after a resume"
    assert steps == [row["step"] for row in _train_rows(reference_rows)]
    assert [row["loss"] for row in _train_rows(metric_rows(tmp_path))] == [
        row["loss"] for row in _train_rows(reference_rows)
    ]


def test_sigkill_with_dataloader_workers(tmp_path):
    run_to_end(tmp_path / "reference", "num_workers=2")
    status, _ = run_until(tmp_path / "killed", "step 8", KILL, "num_workers=2")
    assert status == -KILL
    run_to_end(tmp_path / "killed", "num_workers=2")
    assert_bitwise_equal(final_weights(tmp_path / "killed"), final_weights(tmp_path / "reference"))


@pytest.mark.parametrize(("sig", "code"), [(TERM, 143), (INT, 130)])
def test_preemption_checkpoints_and_exits(tmp_path, reference, sig, code):
    status, output = run_until(tmp_path, "step 5", sig)
    assert status == code, output
    # The signal lands at step 5 or a little later; the checkpoint is at the step boundary where it was seen,
    # which is not a multiple of save_every=3 unless by chance: it was written for the preemption.
    preempted_at = max(int(line.split()[1]) for line in output.splitlines() if line.startswith("step "))
    assert f"preempted by signal {int(sig)}" in output
    assert preempted_at >= 5
    assert (tmp_path / "checkpoints" / f"step-{preempted_at:08d}").is_dir()
    run_to_end(tmp_path)
    assert_bitwise_equal(final_weights(tmp_path), reference[0])


@pytest.mark.parametrize("loader", ["ours", "user"])
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_143(tmp_path, loader):
    # The workers get the signal too (Slurm's scancel): one that died of it would fail the next fetch.
    overrides = ("num_workers=2", f"loader={loader}")
    run_to_end(tmp_path / "reference", *overrides)
    status, output = run_until(tmp_path / "preempted", "step 5", TERM, *overrides, group=True)
    assert status == 143, output
    assert "preempted by signal 15" in output
    assert list((tmp_path / "preempted" / "checkpoints").iterdir())
    run_to_end(tmp_path / "preempted", *overrides)
    assert_bitwise_equal(final_weights(tmp_path / "preempted"), final_weights(tmp_path / "reference"))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, reference):
    status, _ = run_until(tmp_path, "saved " + str(tmp_path / "checkpoints" / "step-00000012"), KILL)
    assert status == -KILL
    # The run may have committed a later checkpoint before the kill landed: damage whichever is newest.
    newest = max((tmp_path / "checkpoints").glob("step-*"))
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    completed = run_to_end(tmp_path)
    assert "skipping damaged checkpoint" in completed.stdout + completed.stderr
    assert newest.name in completed.stdout + completed.stderr
    assert_bitwise_equal(final_weights(tmp_path), reference[0])


def test_every_checkpoint_damaged_refuses_to_restart(tmp_path):
    status, _ = run_until(tmp_path, "saved " + str(tmp_path / "checkpoints" / "step-00000006"), KILL)
    assert status == -KILL
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*"))
    for checkpoint in checkpoints:
        (checkpoint / "manifest.json").write_text("{}")
    import subprocess

    from harness import command, environment

    completed = subprocess.run(
        command(tmp_path), env=environment(), capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "every checkpoint" in completed.stderr
    assert all(checkpoint.name in completed.stderr for checkpoint in checkpoints)


def test_changed_batch_size_on_resume_is_refused(tmp_path):
    status, _ = run_until(tmp_path, "saved " + str(tmp_path / "checkpoints" / "step-00000003"), KILL)
    assert status == -KILL
    from steadyfit import ConfigError, Trainer
    from steadyfit.config import make_config

    config = make_config({"run_dir": str(tmp_path), "batch_size": 16, "grad_accum_steps": 2, "seed": 7})
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 3)
    )
    data = torch.utils.data.TensorDataset(torch.randn(203, 16), torch.zeros(203, dtype=torch.long))
    with pytest.raises(
        ConfigError,
        match=r"another experiment \(.*batch_size: global batch \(batch_size x world size\) 8 in the "
        r"checkpoint, 16 now",
    ):
        Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy).fit()


def test_planted_pickle_is_never_executed(tmp_path):
    status, _ = run_until(tmp_path, "saved " + str(tmp_path / "checkpoints" / "step-00000003"), KILL)
    assert status == -KILL
    # The newest checkpoint is the one a resume would load (a later one may exist by the time the kill lands).
    checkpoint = max((tmp_path / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, checkpoint / "model.safetensors")
    import xxhash

    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest["files"]
    body = (checkpoint / "model.safetensors").read_bytes()
    record = {"size": len(body), "xxh3_128": xxhash.xxh3_128(body).hexdigest()}
    if isinstance(entries, dict):
        entries["model.safetensors"] = record
    else:
        next(e for e in entries if e["name"] == "model.safetensors").update(record)
    manifest_path.write_text(json.dumps(manifest))
    import subprocess

    from harness import command, environment

    completed = subprocess.run(
        command(tmp_path), env=environment(), capture_output=True, text=True, timeout=120
    )
    assert not marker.exists(), "a pickle in a checkpoint was executed"
    assert completed.returncode != 0
    assert checkpoint.name in completed.stderr


def test_rotation_keeps_newest_and_best(tmp_path):
    run_to_end(tmp_path, "keep_last=1", "eval_every=3")
    rows = metric_rows(tmp_path)
    best_step = min((row for row in rows if row["kind"] == "eval"), key=lambda row: row["eval_loss"])["step"]
    remaining = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000039" in remaining
    assert f"step-{best_step:08d}" in remaining
    assert len(remaining) <= 2


def test_second_run_on_the_same_directory_is_refused(tmp_path):
    import subprocess

    from harness import command, environment

    # Long enough never to finish: it is killed once the second run has been refused.
    first = subprocess.Popen(
        command(tmp_path, "max_epochs=1000000"), env=environment(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if line.startswith("step"):
                break
        second = subprocess.run(
            [*command(tmp_path)[:1], "-m", "steadyfit", "fit", f"run_dir={tmp_path}"],
            env=environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2
        assert ".lock" in second.stderr
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


def test_resume_never_refuses_existing_checkpoints(tmp_path):
    status, _ = run_until(tmp_path, "saved " + str(tmp_path / "checkpoints" / "step-00000003"), KILL)
    assert status == -KILL
    import subprocess

    from harness import command, environment

    completed = subprocess.run(
        command(tmp_path, "resume=never"), env=environment(), capture_output=True, text=True
    )
    assert completed.returncode != 0
    assert "resume: 'never'" in completed.stderr
    assert (tmp_path / "checkpoints" / "step-00000003").is_dir()
    shutil.rmtree(tmp_path / "checkpoints")


def _timeless(rows):
    # Start rows describe each attempt (a resumed process writes its own): no part of the trajectory.
    return [
        {k: v for k, v in row.items() if not any(n in k for n in ("time", "per_sec", "memory"))}
        for row in rows
        if row["kind"] != "start"
    ]


@pytest.fixture(scope="module")
def quiet_reference(tmp_path_factory):
    """The uninterrupted run with no step callback: the device-side check defers between read points."""
    base = tmp_path_factory.mktemp("quiet")
    run_to_end(base, "announce=forward")
    return final_weights(base), metric_rows(base)


@pytest.mark.parametrize(("sig", "forward"), [(TERM, 13), (TERM, 27), (KILL, 15), (KILL, 40)])
def test_a_signal_between_save_points_resumes_bitwise(tmp_path, quiet_reference, sig, forward):
    # Save points are steps 3, 6, 9...; forward 13 is the first micro-batch of step 7, 27 of step 14.
    weights, rows = quiet_reference
    # A SIGTERM must land before the next save point: the run holds in that forward until it is sent.
    hold = (f"hold={forward}",) if sig == TERM else ()
    status, output = run_until(
        tmp_path, f"forward {forward}", sig, "announce=forward", *hold, release=sig == TERM
    )
    if sig == TERM:
        assert status == 143, output
        preempted = [line for line in output.splitlines() if "preempted by signal" in line]
        step = int(preempted[0].split("step-")[1].split()[0])
        assert step % 3, "the preemption checkpoint lands between save points"
    else:
        assert status == -KILL
    run_to_end(tmp_path, "announce=forward")
    assert_bitwise_equal(final_weights(tmp_path), weights)
    assert _timeless(metric_rows(tmp_path)) == _timeless(rows)


def test_rerunning_a_finished_run_changes_nothing(tmp_path, reference):
    weights, _ = reference
    run_to_end(tmp_path)
    rows = metric_rows(tmp_path)
    completed = run_to_end(tmp_path)
    assert "done 39" in completed.stdout
    assert_bitwise_equal(final_weights(tmp_path), weights)
    assert _timeless(metric_rows(tmp_path)) == _timeless(rows)


def test_a_kill_after_the_last_checkpoint_still_finishes(tmp_path, reference):
    weights, reference_rows = reference
    last = tmp_path / "checkpoints" / "step-00000039"
    status, _ = run_until(tmp_path, f"saved {last}", KILL)
    assert status == -KILL
    completed = run_to_end(tmp_path)
    assert "done 39" in completed.stdout
    assert_bitwise_equal(final_weights(tmp_path), weights)
    assert _timeless(metric_rows(tmp_path)) == _timeless(reference_rows)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_augmenting_dataset_resumes_bitwise(tmp_path, workers):
    # The dataset draws from torch, numpy and python RNGs in __getitem__: in this process without workers
    # (streams saved with the checkpoint), in the workers with them (streams seeded by batch position).
    options = ("augment=1", f"num_workers={workers}", "announce=forward")
    run_to_end(tmp_path / "a", *options)
    run_to_end(tmp_path / "b", *options)
    assert_bitwise_equal(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    status, _ = run_until(tmp_path / "killed", "forward 23", KILL, *options)
    assert status == -KILL
    run_to_end(tmp_path / "killed", *options)
    assert_bitwise_equal(final_weights(tmp_path / "killed"), final_weights(tmp_path / "a"))


def test_kept_eval_workers_resume_bitwise(tmp_path):
    # Augmenting eval data read by eval workers kept from one evaluation to the next: the resumed run's
    # workers are fresh, and every evaluation still draws the same noise (each batch is seeded by position).
    options = ("augment=2", "num_workers=2", "persistent_workers=true", "eval_every=2", "announce=forward")
    run_to_end(tmp_path / "reference", *options)
    status, _ = run_until(tmp_path / "killed", "forward 23", KILL, *options)
    assert status == -KILL
    run_to_end(tmp_path / "killed", *options)
    assert_bitwise_equal(final_weights(tmp_path / "killed"), final_weights(tmp_path / "reference"))
    evaluated = [row for row in metric_rows(tmp_path / "reference") if "eval_loss" in row]
    assert len(evaluated) > 3
    assert _timeless(metric_rows(tmp_path / "killed")) == _timeless(metric_rows(tmp_path / "reference"))
