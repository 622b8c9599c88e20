"""A training run for the fault tests: `python train_script.py RUN_DIR key=value ...`.

Prints `step N` after every optimizer step and `saved PATH` after each committed checkpoint (flushed), so
a test can time its signal on what the child says, never on sleeps. The model is built after seeding, so
every process starts from the same weights.

Keys beyond TrainConfig's fields: `width` (hidden units); `announce=forward` prints `forward N` before each
training forward instead of `step N` (a step callback would make every step a read point, hiding what the
device-side check defers); `hold=N` (with `announce=forward`) waits after printing `forward N` until a line
arrives on stdin, so a test's signal lands in that micro-batch however slowly the test reacts; `augment=1`
trains on a dataset whose `__getitem__` draws from the torch, numpy and python RNGs (an augmentation),
through the DataLoader; `loader=user` passes the training data as the user's own shuffling DataLoader
(with `num_workers` workers of its own).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from steadyfit import Callback, Trainer, seed_everything
from steadyfit.config import make_config, parse_overrides


class AnnounceSteps(Callback):
    def on_step_end(self, trainer, state):
        print(f"step {state.step}", flush=True)


class AnnounceCheckpoints(Callback):
    def on_checkpoint_saved(self, trainer, state, path):
        print(f"saved {path}", flush=True)


class AnnounceForwards:
    def __init__(self, hold: int):
        self.count = 0
        self.hold = hold

    def __call__(self, module, args):
        if module.training:
            self.count += 1
            print(f"forward {self.count}", flush=True)
            if self.count == self.hold:
                sys.stdin.readline()  # the test's signal arrives meanwhile; then it lets the run go on


def build(width: int):
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(203, 16, generator=generator)
    targets = (inputs[:, :4].sum(dim=1) > 0).long() + (inputs[:, 4] > 1).long()
    data = torch.utils.data.TensorDataset(inputs, targets)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(width, 3)
    )
    return model, data


class ListData(torch.utils.data.Dataset):
    """A plain map-style dataset (not a TensorDataset), to go through DataLoader workers."""

    def __init__(self, tensors):
        self.inputs, self.targets = tensors.tensors

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


class AugmentedData(ListData):
    """Noise from all three RNGs on every sample, as an augmenting dataset draws it."""

    def __getitem__(self, index):
        noise = torch.randn(16) * 0.1 + float(np.random.normal(0, 0.1)) + random.gauss(0, 0.1)
        return self.inputs[index] + noise, self.targets[index]


def main() -> None:
    run_dir, *overrides = sys.argv[1:]
    values = {
        "run_dir": run_dir,
        "seed": 7,
        "batch_size": 8,
        "grad_accum_steps": 2,
        "max_epochs": 3,
        "save_every": 3,
        "keep_last": 2,
        "log_every": 2,
        "deterministic": True,
        "progress": False,
        "lr": 0.01,
        "scheduler": "cosine",
        "warmup_steps": 3,
        "max_grad_norm": 1.0,
    }
    values.update(parse_overrides(overrides))
    width = int(values.pop("width", 32))
    announce = values.pop("announce", "step")
    augment = int(values.pop("augment", 0))  # 1: the training data draws noise; 2: the eval data too
    hold = int(values.pop("hold", 0))
    user_loader = values.pop("loader", "ours") == "user"
    config = make_config(values)
    seed_everything(config.seed)
    torch.set_num_threads(1)
    model, data = build(width)
    train = AugmentedData(data) if augment else ListData(data) if config.num_workers else data
    if user_loader:
        train = torch.utils.data.DataLoader(
            train, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers
        )
    callbacks = [AnnounceCheckpoints()]
    if announce == "forward":
        model.register_forward_pre_hook(AnnounceForwards(hold))
    else:
        callbacks.append(AnnounceSteps())
    trainer = Trainer(
        model,
        config,
        train_data=train,
        eval_data=AugmentedData(data) if augment == 2 else data,
        loss_fn=torch.nn.functional.cross_entropy,
        callbacks=callbacks,
    )
    result = trainer.fit()
    print(f"done {result.global_step}", flush=True)


if __name__ == "__main__":
    main()
