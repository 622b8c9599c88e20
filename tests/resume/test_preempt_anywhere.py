"""Guarantees 2 and 4 where they are hardest: a preemption at every step offset, not only at save points.

SIGTERM is raised in this process from a forward hook (not a step callback, which would make every step a
read point and hide what the device-side check defers), at every micro-batch of two save intervals and
more. Each preempted run writes its checkpoint at the boundary where it saw the signal; rerunning it must
end bitwise equal to the run that never stopped, with the same metrics rows, each written once.
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Preempted, Trainer, seed_everything

CE = torch.nn.functional.cross_entropy
# 90 samples, batch 8, accumulation 2: 6 steps an epoch (the last window short), 18 in all.
SETTINGS = {
    "batch_size": 8,
    "grad_accum_steps": 2,
    "max_epochs": 3,
    "save_every": 4,
    "log_every": 3,
    "eval_every": 5,
    "deterministic": True,
    "scheduler": "cosine",
    "warmup_steps": 2,
    "max_grad_norm": 1.0,
    "lr": 0.02,
}
SAVE_INTERVALS = 2


class TerminateAtForward:
    """Raises SIGTERM in this process when the model's ``at``-th training forward starts."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.count = 0

    def __call__(self, module, args):
        if not module.training:
            return
        self.count += 1
        if self.count == self.at:
            signal.raise_signal(signal.SIGTERM)


def _run(run_dir, terminate_at=None, **overrides):
    """One fit on run_dir; returns the trainer, or None when it was preempted (after checking it was)."""
    seed_everything(0)
    model = make_mlp(dropout=0.2)
    model.register_forward_pre_hook(TerminateAtForward(terminate_at))
    config = base_config(run_dir, **{**SETTINGS, **overrides})
    data, held_out = make_regression(90), make_regression(30, seed=1)
    trainer = Trainer(model, config, train_data=data, eval_data=held_out, loss_fn=CE)
    if terminate_at is None:
        trainer.fit()
        return trainer
    with pytest.raises(Preempted) as preempted:
        trainer.fit()
    assert preempted.value.code == 143
    assert preempted.value.checkpoint == str(
        run_dir / "run" / "checkpoints" / f"step-{trainer.state.step:08d}"
    )
    return None


def _rows(run_dir):
    lines = (run_dir / "run" / "metrics.jsonl").read_text().splitlines()
    noisy = ("time", "per_sec", "memory")
    rows = [json.loads(line) for line in lines]
    # Start rows describe each attempt (a resumed process writes its own): no part of the trajectory.
    return [
        {key: value for key, value in row.items() if not any(n in key for n in noisy)}
        for row in rows
        if row["kind"] != "start"
    ]


def _assert_same_run(reference, resumed, reference_dir, resumed_dir):
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.state.to_dict() | {"best_checkpoint": None} == reference.state.to_dict() | {
        "best_checkpoint": None
    }
    assert resumed.scheduler.state_dict() == reference.scheduler.state_dict()
    # Every row once, with the same numbers: train loss, lr and grad norm step by step, eval metrics.
    assert _rows(resumed_dir) == _rows(reference_dir)


@pytest.fixture(scope="module", params=["adamw", "sgd"])
def reference(request, tmp_path_factory):
    """The uninterrupted run (adamw: device-side non-finite check; sgd: host-side), run twice."""
    optimizer = request.param
    overrides = {"optimizer": optimizer, "momentum": 0.9 if optimizer == "sgd" else 0.0}
    first = tmp_path_factory.mktemp(f"reference-{optimizer}")
    trainer = _run(first, **overrides)
    if optimizer == "adamw":
        assert trainer.device_skip is not None, "the default optimizer must take the device-side path"
    again = tmp_path_factory.mktemp(f"again-{optimizer}")
    _assert_same_run(trainer, _run(again, **overrides), first, again)
    return trainer, first, overrides


@pytest.mark.parametrize("forward", range(1, 2 * SAVE_INTERVALS * SETTINGS["save_every"] * 2 + 3))
def test_a_preemption_at_any_micro_batch_resumes_bitwise(tmp_path, reference, forward):
    trainer, reference_dir, overrides = reference
    _run(tmp_path, terminate_at=forward, **overrides)
    # The step under way when the signal came is finished and checkpointed, not a later one.
    current_step = -(-forward // SETTINGS["grad_accum_steps"])
    assert max(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == f"step-{current_step:08d}"
    resumed = _run(tmp_path, **overrides)
    _assert_same_run(trainer, resumed, reference_dir, tmp_path)


def test_several_preemptions_in_one_run_resume_bitwise(tmp_path, reference):
    trainer, reference_dir, overrides = reference
    # Forward counts restart with each process: 3 forwards in, then 7 more, then 11 more, then the rest.
    for forward in (3, 7, 11):
        _run(tmp_path, terminate_at=forward, **overrides)
    resumed = _run(tmp_path, **overrides)
    _assert_same_run(trainer, resumed, reference_dir, tmp_path)


def test_a_preemption_checkpoint_describes_one_step(tmp_path, reference):
    """What the checkpoint holds agrees with itself: step, epoch, position, schedule and logging window."""
    _, _, overrides = reference
    _run(tmp_path, terminate_at=9, **overrides)  # the 5th step's first micro-batch
    checkpoint = next((tmp_path / "run" / "checkpoints").iterdir())
    state = json.loads((checkpoint / "state.json").read_text())["state"]
    trainer_state = state["trainer_state"]
    step = trainer_state["step"]
    assert checkpoint.name == f"step-{step:08d}"
    assert state["scheduler"]["last_epoch"] == step
    assert state["scheduler"]["_step_count"] == step + 1
    assert trainer_state["epoch"] * 12 + trainer_state["batch_in_epoch"] == 2 * step
    assert state["window"]["pending_steps"] == step % SETTINGS["log_every"]


EPOCH_CADENCES = {"log_every": "epoch", "eval_every": "epoch", "save_every": "epoch"}


@pytest.fixture(scope="module")
def epoch_reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference-epoch")
    return _run(directory, **EPOCH_CADENCES), directory


@pytest.mark.parametrize("forward", [3, 13, 20, 31])
def test_epoch_cadences_resume_bitwise_after_a_preemption_mid_epoch(tmp_path, epoch_reference, forward):
    trainer, reference_dir = epoch_reference
    _run(tmp_path, terminate_at=forward, **EPOCH_CADENCES)
    _assert_same_run(trainer, _run(tmp_path, **EPOCH_CADENCES), reference_dir, tmp_path)
    # 6 steps an epoch: rows and checkpoints at the three epoch ends only (and the preemption's checkpoint).
    rows = _rows(tmp_path)
    assert [row["step"] for row in rows if row.get("kind") == "train"] == [6, 12, 18]
    assert [row["step"] for row in rows if row.get("kind") == "eval"] == [6, 12, 18]
    saved = {path.name for path in (reference_dir / "run" / "checkpoints").iterdir()}
    assert saved == {"step-00000006", "step-00000012", "step-00000018"}
