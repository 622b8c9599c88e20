"""DataLoader workers live for the whole fit (persistent workers) and fetch exactly the batches that fresh
workers started at every epoch would: the order is the sampler's, each batch's random streams are seeded
from its (seed, epoch, rank, position) key."""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import base_config, metric_rows
from steadyfit import Trainer
from steadyfit import data as data_mod
from steadyfit.config import ConfigError

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


class SeesModes(SeesInputs):
    """Records whether each batch came to a training step or to an evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return super().forward(features)


EVAL_EVERY = 2  # steps: 3 epochs of 6 steps give 9 evaluations


def _fit_evaluating(tmp_path, persistent: bool, **overrides) -> tuple[SeesModes, Trainer]:
    torch.manual_seed(0)  # the same initial weights in every fit
    model = SeesModes()
    config = base_config(
        tmp_path / ("kept" if persistent else "fresh"),
        batch_size=BATCH,
        num_workers=WORKERS,
        persistent_workers=persistent,
        max_epochs=EPOCHS,
        max_steps=None,
        eval_every=EVAL_EVERY,
        **overrides,
    )
    trainer = Trainer(
        model, config, train_data=AugmentingData(), eval_data=AugmentingData(), loss_fn=F.cross_entropy
    )
    trainer.fit()
    return model, trainer


def _eval_batches(model: SeesModes) -> list[torch.Tensor]:
    return [batch for batch, training in zip(model.seen, model.modes, strict=True) if not training]


def _eval_rows(trainer: Trainer) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k.startswith("eval_") or k == "step"}
        for row in metric_rows(Path(trainer.config.run_dir))
        if "eval_loss" in row
    ]


def test_persistent_workers_keep_the_eval_workers_from_one_evaluation_to_the_next(tmp_path):
    before = set(multiprocessing.active_children())
    kept, _trainer = _fit_evaluating(tmp_path, persistent=True)
    evaluations = EPOCHS * (SAMPLES // BATCH) // EVAL_EVERY
    eval_batches = _eval_batches(kept)
    assert len(eval_batches) == evaluations * (SAMPLES // BATCH)
    pids = {int(pid) for batch in eval_batches for pid in batch[:, 2].tolist()}
    assert len(pids) == WORKERS, f"{len(pids)} eval worker processes over {evaluations} evaluations"
    assert set(multiprocessing.active_children()) <= before, "the eval workers outlived fit()"
    assert not any(_is_running(pid) for pid in pids), "an eval worker process is still there (or unreaped)"
    # Without the field, every evaluation starts workers of its own: what the count above would catch.
    fresh, _trainer = _fit_evaluating(tmp_path, persistent=False)
    fresh_pids = {int(pid) for batch in _eval_batches(fresh) for pid in batch[:, 2].tolist()}
    assert len(fresh_pids) == WORKERS * evaluations


@pytest.mark.parametrize("limit", [None, 2], ids=["whole", "limit_eval_batches"])
def test_kept_eval_workers_change_no_score_and_no_weight(tmp_path, limit):
    # With a limit, each evaluation leaves the kept loader part-way: the next one must start afresh.
    kept, kept_trainer = _fit_evaluating(tmp_path, persistent=True, limit_eval_batches=limit)
    fresh, fresh_trainer = _fit_evaluating(tmp_path, persistent=False, limit_eval_batches=limit)
    assert len(_eval_batches(kept)) == len(_eval_rows(kept_trainer)) * (limit or SAMPLES // BATCH)
    # The same samples with the same augmentation draws, evaluation after evaluation...
    for got, want in zip(_eval_batches(kept), _eval_batches(fresh), strict=True):
        assert torch.equal(got[:, :2], want[:, :2])
    # ...so the same scores, and (the best checkpoint and early stopping read them) the same training.
    assert _eval_rows(kept_trainer) == _eval_rows(fresh_trainer)
    assert len(_eval_rows(kept_trainer)) == EPOCHS * (SAMPLES // BATCH) // EVAL_EVERY
    for name, weight in kept.state_dict().items():
        assert torch.equal(weight, fresh.state_dict()[name]), name


def test_evaluate_after_fit_starts_and_stops_its_own_workers(tmp_path):
    model, trainer = _fit_evaluating(tmp_path, persistent=True)
    before = set(multiprocessing.active_children())
    scores = trainer.evaluate()
    assert scores["eval_loss"] == _eval_rows(trainer)[-1]["eval_loss"]
    pids = {int(pid) for batch in _eval_batches(model)[-(SAMPLES // BATCH) :] for pid in batch[:, 2].tolist()}
    assert not any(_is_running(pid) for pid in pids), "evaluate() outside fit() kept its workers"
    assert set(multiprocessing.active_children()) <= before


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(2, dtype=torch.float64), torch.tensor(0))] * 4)


def test_persistent_workers_is_refused_where_it_cannot_keep_or_would_change_workers(tmp_path):
    with pytest.raises(ConfigError, match=r"persistent_workers: .*num_workers is 0"):
        Trainer(SeesInputs(), base_config(tmp_path, persistent_workers=True), train_data=AugmentingData())
    config = base_config(tmp_path, persistent_workers=True, num_workers=WORKERS)
    with pytest.raises(ConfigError, match="persistent_workers: eval_data is an IterableDataset"):
        Trainer(SeesInputs(), config, train_data=AugmentingData(), eval_data=Stream())


def test_a_users_eval_dataloader_decides_persistent_workers(tmp_path):
    loader = torch.utils.data.DataLoader(
        AugmentingData(), batch_size=BATCH, num_workers=1, persistent_workers=True
    )
    trainer = Trainer(SeesInputs(), base_config(tmp_path), train_data=AugmentingData(), eval_data=loader)
    assert trainer.config.persistent_workers is True  # config.yaml records what happens
    with pytest.raises(
        ConfigError, match="persistent_workers: False, but the DataLoader passed as eval_data"
    ):
        Trainer(
            SeesInputs(),
            base_config(tmp_path, persistent_workers=False),
            train_data=AugmentingData(),
            eval_data=loader,
        )


class CountsFetches(torch.utils.data.Dataset):
    """Appends every index it fetches to a file of the fetching process (workers are other processes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(self.directory / f"{os.getpid()}.txt", "a") as log:
            log.write(f"{index}\n")
        return torch.tensor([float(index), 0.0, 0.0], dtype=torch.float64), torch.tensor(index % 2)


@pytest.mark.parametrize("persistent", [False, True], ids=["fresh", "kept"])
def test_a_limited_evaluation_fetches_no_batch_past_its_limit(tmp_path, persistent):
    # Workers fetch ahead (4 batches each): without an end in the sampler they would load batches the
    # evaluation never reads, and kept workers would go on loading them while training runs.
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    config = base_config(
        tmp_path,
        batch_size=BATCH,
        num_workers=WORKERS,
        persistent_workers=persistent,
        max_epochs=1,
        max_steps=None,
        eval_every=EVAL_EVERY,
        limit_eval_batches=2,
    )
    trainer = Trainer(
        SeesInputs(),
        config,
        train_data=AugmentingData(),
        eval_data=CountsFetches(fetched),
        loss_fn=F.cross_entropy,
    )
    trainer.fit()
    evaluations = (SAMPLES // BATCH) // EVAL_EVERY
    indices = sorted(int(line) for log in fetched.iterdir() for line in log.read_text().split())
    assert indices == sorted(list(range(2 * BATCH)) * evaluations)
