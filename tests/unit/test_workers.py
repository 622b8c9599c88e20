"""DataLoader workers live for the whole fit (persistent workers) and fetch exactly the batches that fresh
workers started at every epoch would: the order is the sampler's, each batch's random streams are seeded
from its (seed, epoch, rank, position) key."""

from __future__ import annotations

import multiprocessing
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from helpers import base_config
from steadyfit import Trainer
from steadyfit import data as data_mod

SAMPLES, BATCH, EPOCHS, WORKERS = 24, 4, 3, 2


class AugmentingData(torch.utils.data.Dataset):
    """Each sample draws from torch, numpy and python (an augmentation) and carries the fetching pid."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.rand(1).item() + np.random.rand() + random.random()
        features = torch.tensor([float(index), noise, float(os.getpid())], dtype=torch.float64)
        return features, torch.tensor(index % 2)


class SeesInputs(torch.nn.Module):
    """Trains on the first two features and records every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2, dtype=torch.float64)
        self.seen: list[torch.Tensor] = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.seen.append(features.detach().clone())
        return self.linear(features[:, :2])


def _fit(tmp_path) -> tuple[SeesInputs, Trainer]:
    model = SeesInputs()
    config = base_config(tmp_path, batch_size=BATCH, num_workers=WORKERS, max_epochs=EPOCHS, max_steps=None)
    trainer = Trainer(model, config, train_data=AugmentingData(), loss_fn=F.cross_entropy)
    trainer.fit()
    return model, trainer


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_same_workers_serve_every_epoch_and_stop_with_fit(tmp_path):
    # Other tests in this process may have left loader workers of their own (held by a saved traceback).
    before = set(multiprocessing.active_children())
    model, _trainer = _fit(tmp_path)  # the trainer lives on, as a user's does after fit()
    batches_per_epoch = SAMPLES // BATCH
    assert len(model.seen) == EPOCHS * batches_per_epoch
    pids = {int(pid) for batch in model.seen for pid in batch[:, 2].tolist()}
    assert len(pids) == WORKERS, f"{len(pids)} worker processes over {EPOCHS} epochs; expected {WORKERS}"
    assert set(multiprocessing.active_children()) <= before, "the workers outlived fit()"
    assert not any(_is_running(pid) for pid in pids), "a worker process is still there (or unreaped)"


def test_persistent_workers_fetch_what_fresh_workers_of_each_epoch_fetch(tmp_path):
    seen = _fit(tmp_path)[0].seen
    spec = data_mod.LoaderSpec(
        batch_size=BATCH,
        eval_batch_size=BATCH,
        num_workers=WORKERS,
        seed=base_config(tmp_path).seed,
        pin_memory=False,
    )
    expected = []
    for epoch in range(EPOCHS):
        sampler = data_mod.ResumableBatchSampler(SAMPLES, BATCH, seed=spec.seed, epoch=epoch)
        # The loader of one epoch, with workers started for it and stopped after it.
        expected += [
            inputs for inputs, _ in data_mod._map_style_loader(AugmentingData(), sampler, spec, epoch)
        ]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got[:, :2], want[:, :2])  # same samples, same augmentation draws
