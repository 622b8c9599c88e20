"""Training runs for the distributed tests: `torchrun ... dist_script.py RUN_DIR key=value [-- RUN_DIR ...]`.

Each `RUN_DIR key=value ...` group is one run; several groups run one after another in the same processes,
which then hold the process group themselves (the Trainer joins it), so one launch pays torch's start-up
once; with a leading `--trainer-owns-group` each run's Trainer creates and destroys it instead. A single
group leaves the process group to the Trainer, as a user script would.

Keys beyond TrainConfig's fields: `loss` (mean: a classifier's cross-entropy; pair: a ragged token loss
returning `(sum, count)`), `dropout`, `train_size`, `eval_size`, `nan_at` (rank 1 returns a NaN loss once,
in optimizer step `nan_at`), `mode` (fit, or evaluate: score the untrained model without training) and
`forbid_pickle` (1: `pickle.load`, `pickle.loads` and `torch.load` raise while the run chooses and loads its
checkpoint, so a load that unpickles anything fails the run) and `unused_branch` (1: the model holds a
linear layer it never calls, whose parameters get no gradient and so no optimizer state).
`fail_write_on_rank` (a rank: its sharded checkpoint writes raise ENOSPC) makes a run end with
`result RANK {"error": ...}` when the save fails. `keep_trainer` (1: the run's Trainer stays referenced until
the process exits, as a user script's global `trainer` does). `user_loader` (1: the training data is the
user's own DataLoader with a shuffling DistributedSampler, whose order steadyfit does not own).

Prints, flushed, for the tests to synchronise on (it never sleeps, but for `pause_at`): `pid RANK PID` at
start, `step RANK N` after each optimizer step, `saved PATH` after each committed checkpoint (rank 0),
`exit RANK STATUS` when a preemption ends the run, `result RANK {json}` at the end of each run and
`threads RANK AT_START AT_EXIT` last (the threads of the process when main() began and when the
interpreter is about to finalize).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import pickle
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.utils.data import DataLoader, DistributedSampler

from steadyfit import Callback, Preempted, Trainer, seed_everything
from steadyfit.checkpoint import CheckpointError
from steadyfit.config import make_config, parse_overrides
from steadyfit.distributed import destroy_group

FEATURES = 6
CLASSES = 3
SEQUENCE = 5
IGNORE = -100
SCRIPT_KEYS = {
    "loss": "mean",
    "dropout": 0.0,
    "train_size": 33,
    "eval_size": 25,
    "nan_at": 0,
    "mode": "fit",
    "forbid_pickle": 0,
    "unused_branch": 0,
    "stop_on_log_at": 0,
    "user_loader": 0,
    "pause_at": "",
}
DEFAULTS = {
    "seed": 7,
    "batch_size": 4,
    "max_epochs": 2,
    "log_every": 1,
    "progress": False,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "max_grad_norm": 1.0,
}


# Trainers kept alive until the process exits (`keep_trainer=1`), as a user script's global `trainer` is.
KEPT: list[Trainer] = []


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(line: str) -> None:
    # One write per line: both ranks share torchrun's stdout, and print() would write the newline apart.
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def make_data(size: int, loss: str, seed: int) -> torch.utils.data.TensorDataset:
    """Classification samples (mean loss) or padded sequences of 1..SEQUENCE tokens (pair loss)."""
    generator = torch.Generator().manual_seed(seed)
    if loss == "mean":
        inputs = torch.randn(size, FEATURES, generator=generator)
        targets = (inputs[:, :2].sum(dim=1) > 0).long() + (inputs[:, 2] > 1).long()
        return torch.utils.data.TensorDataset(inputs, targets)
    inputs = torch.randn(size, SEQUENCE, FEATURES, generator=generator)
    targets = (inputs[..., :2].sum(dim=-1) > 0).long() + (inputs[..., 2] > 1).long()
    lengths = torch.randint(1, SEQUENCE + 1, (size, 1), generator=generator)
    targets[torch.arange(SEQUENCE).expand(size, SEQUENCE) >= lengths] = IGNORE
    return torch.utils.data.TensorDataset(inputs, targets)


class SkipsItsLast(torch.nn.Sequential):
    """A Sequential that never calls its last module: an unused branch (e.g. an optional head)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for module in list(self)[:-1]:
            inputs = module(inputs)
        return inputs


def make_model(dropout: float, unused_branch: bool = False) -> torch.nn.Module:
    """Two linear blocks (FSDP2 shards each), applied per token for sequences; with ``unused_branch`` a third
    one that is never called. Seed before calling."""
    layers = [
        torch.nn.Linear(FEATURES, 16),
        torch.nn.Tanh(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(16, CLASSES),
    ]
    if unused_branch:
        return SkipsItsLast(*layers, torch.nn.Linear(FEATURES, CLASSES))
    return torch.nn.Sequential(*layers)


def token_loss(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over real tokens, with their count: the `(sum, count)` contract."""
    total = torch.nn.functional.cross_entropy(
        outputs.reshape(-1, CLASSES), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, (targets != IGNORE).sum()


def token_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    real = targets != IGNORE
    return ((outputs.argmax(dim=-1) == targets) & real).sum().float(), real.sum()


def class_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (outputs.argmax(dim=-1) == targets).sum().float(), targets.numel()


def forbid_unpickling_on_resume() -> None:
    """From now on in this process, loading a pickle raises while a run resumes.

    Only there: the process group's object collectives unpickle between our own processes, and tensors in
    them (RNG states gathered for a save) go through torch.load.
    """
    resume = Trainer._resume

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something tried to unpickle while loading a checkpoint")

    def resume_without_pickle(trainer: Trainer) -> None:
        allowed = pickle.load, pickle.loads, torch.load
        pickle.load = pickle.loads = torch.load = refuse
        try:
            resume(trainer)
        finally:
            pickle.load, pickle.loads, torch.load = allowed

    Trainer._resume = resume_without_pickle


class Announce(Callback):
    """Prints what the tests wait for, and tells the poisoned loss which step is running.

    ``pause_at`` ("RANK:STEP"): that rank pauses a second after printing that step, for a test that signals
    it on reading the line: on a loaded machine the test may read it only steps later, after the boundary
    it means to interrupt."""

    def __init__(self, pause_at: str = "") -> None:
        self.steps_done = 0
        self.pause_at = pause_at

    def on_fit_start(self, trainer, state):
        self.steps_done = state.step

    def on_step_end(self, trainer, state):
        self.steps_done = state.step
        say(f"step {rank()} {state.step}")
        if self.pause_at == f"{rank()}:{state.step}":
            time.sleep(1.0)

    def on_checkpoint_saved(self, trainer, state, path):
        say(f"saved {path}")


class StopOnLog(Callback):
    """Requests a stop from ``on_log`` (rank 0 alone sees rows) once a train row reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, trainer, state, row):
        if row.get("kind") == "train" and row["step"] >= self.step:
            trainer.request_stop(f"on_log saw step {row['step']}")


class PoisonOnce:
    """Wraps a loss: rank 1 returns NaN once, in optimizer step ``step`` (1-based), in training only."""

    def __init__(self, loss_fn, announce: Announce, step: int) -> None:
        self.loss_fn = loss_fn
        self.announce = announce
        self.step = step
        self.fired = False

    def __call__(self, outputs, targets):
        value = self.loss_fn(outputs, targets)
        if self.fired or rank() != 1 or not torch.is_grad_enabled():
            return value
        if self.announce.steps_done + 1 != self.step:
            return value
        self.fired = True
        if isinstance(value, tuple):
            return value[0] * float("nan"), value[1]
        return value * float("nan")


def build_trainer(run_dir: str, overrides: dict[str, Any]) -> tuple[Trainer, str]:
    """The Trainer of one run (model built after seeding, so every process starts from the same weights)."""
    values = {"run_dir": run_dir, **DEFAULTS, **overrides}
    script = {key: values.pop(key, default) for key, default in SCRIPT_KEYS.items()}
    config = make_config(values)
    if script["forbid_pickle"]:
        forbid_unpickling_on_resume()
    seed_everything(config.seed)
    model = make_model(float(script["dropout"]), bool(script["unused_branch"]))
    loss = str(script["loss"])
    train = make_data(int(script["train_size"]), loss, seed=1)
    evaluation = make_data(int(script["eval_size"]), loss, seed=2)
    if script["user_loader"]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        sampler = DistributedSampler(train, num_replicas=world_size, rank=rank(), shuffle=True, seed=3)
        train = DataLoader(train, batch_size=config.batch_size, sampler=sampler)
    announce = Announce(str(script["pause_at"]))
    loss_fn: Any = token_loss if loss == "pair" else torch.nn.functional.cross_entropy
    if script["nan_at"]:
        loss_fn = PoisonOnce(loss_fn, announce, int(script["nan_at"]))
    metric = token_accuracy if loss == "pair" else class_accuracy
    trainer = Trainer(
        model,
        config,
        train_data=train,
        eval_data=evaluation,
        loss_fn=loss_fn,
        metrics={"accuracy": metric},
        callbacks=[announce, StopOnLog(int(script["stop_on_log_at"]))]
        if script["stop_on_log_at"]
        else [announce],
    )
    return trainer, str(script["mode"])


@contextlib.contextmanager
def failing_shard_writes(enabled: bool) -> Iterator[None]:
    """While enabled, this process's DCP safetensors writes fail like a full disk (a partial file left),
    inside DCP's collective save as a real disk error would."""
    writer = dcp.HuggingFaceStorageWriter
    write = writer.write_data

    def write_part_then_fail(self: Any, plan: Any, planner: Any) -> Any:
        with open(os.path.join(self.path, f"partial-{rank()}.safetensors"), "wb") as partial:
            partial.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    if enabled:
        writer.write_data = write_part_then_fail
    try:
        yield
    finally:
        writer.write_data = write


def run(run_dir: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One run; returns what the tests compare."""
    overrides = dict(overrides)
    failing_rank = int(overrides.pop("fail_write_on_rank", -1))
    keep_trainer = bool(int(overrides.pop("keep_trainer", 0)))
    trainer, mode = build_trainer(run_dir, overrides)
    if keep_trainer:
        KEPT.append(trainer)
    if mode == "evaluate":
        return {"metrics": trainer.evaluate()}
    try:
        with failing_shard_writes(rank() == failing_rank):
            result = trainer.fit()
    except Preempted as exc:
        say(f"exit {rank()} {exc.code}")
        raise
    except CheckpointError as exc:
        if failing_rank < 0:
            raise
        return {"error": str(exc)}
    return {
        "global_step": result.global_step,
        "nonfinite_skips": result.nonfinite_skips,
        "metrics": result.metrics,
    }


def split_runs(arguments: list[str]) -> list[tuple[str, dict[str, Any]]]:
    runs, current = [], []
    for argument in [*arguments, "--"]:
        if argument != "--":
            current.append(argument)
            continue
        if current:
            runs.append((current[0], parse_overrides(current[1:])))
        current = []
    return runs


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> None:
    # Registered first, so it runs last, after steadyfit's own exit handler: the threads left when the
    # interpreter is about to finalize, against those at the start.
    at_start = threads()
    atexit.register(lambda: say(f"threads {rank()} {at_start} {threads()}"))
    torch.set_num_threads(1)
    arguments = sys.argv[1:]
    # --trainer-owns-group: each run's Trainer creates and destroys the process group, as in a user script
    # that calls fit() more than once.
    trainer_owns_group = arguments[:1] == ["--trainer-owns-group"]
    runs = split_runs(arguments[1:] if trainer_owns_group else arguments)
    say(f"pid {rank()} {os.getpid()}")
    owns_group = len(runs) > 1 and "WORLD_SIZE" in os.environ and not trainer_owns_group
    if owns_group:
        dist.init_process_group("gloo")
    try:
        for run_dir, overrides in runs:
            say(f"result {rank()} {json.dumps(run(run_dir, overrides))}")
    finally:
        if owns_group:
            # Tear down together: a rank leaving while its peer still talks to it aborts the process.
            dist.barrier()
            # Not dist.destroy_process_group() alone: the runs' garbage still holds the group, whose
            # gloo threads would then outlive the interpreter and can abort the process at exit.
            destroy_group()


if __name__ == "__main__":
    main()
