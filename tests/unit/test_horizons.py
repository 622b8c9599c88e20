"""Derived horizons are functions of the dataset length and the global batch, at every world size."""

from __future__ import annotations

import pytest
import torch

from steadyfit import ConfigError, TrainConfig
from steadyfit.horizons import compute_horizons

DATA = torch.utils.data.TensorDataset(torch.zeros(512, 1))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_the_same_global_batch_plans_the_same_run(world_size, grad_accum_steps):
    # One rank with batch 48 and N ranks with 48 / N each see the same global micro-batches.
    per_rank = 48 // world_size
    config = TrainConfig(
        batch_size=per_rank,
        grad_accum_steps=grad_accum_steps,
        max_epochs=3,
        scheduler="wsd",
        warmup_ratio=0.1,
        decay_ratio=0.2,
    )
    horizons = compute_horizons(config, DATA, world_size=world_size)
    reference = compute_horizons(config.model_copy(update={"batch_size": 48}), DATA, world_size=1)
    assert horizons.global_batch == 48 * grad_accum_steps
    assert horizons.batches_per_epoch == reference.batches_per_epoch == 11  # ceil(512 / 48)
    assert horizons.steps_per_epoch == reference.steps_per_epoch == -(-11 // grad_accum_steps)
    assert horizons.total_steps == reference.total_steps == 3 * horizons.steps_per_epoch
    assert horizons.warmup_steps == reference.warmup_steps
    assert horizons.decay_steps == reference.decay_steps


def test_max_steps_caps_the_epochs_and_the_schedule_follows():
    config = TrainConfig(batch_size=16, max_epochs=10, max_steps=50, warmup_ratio=0.1)
    horizons = compute_horizons(config, DATA, world_size=2)
    assert (horizons.steps_per_epoch, horizons.total_steps, horizons.warmup_steps) == (16, 50, 5)
    assert horizons.ends_epoch(16) and not horizons.ends_epoch(15)


def test_a_user_dataloader_counts_its_own_batches_per_rank():
    # A DistributedSampler already splits the data over ranks: len(loader) is the per-rank count.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(100, 1)), batch_size=10)
    horizons = compute_horizons(TrainConfig(grad_accum_steps=3, max_epochs=2), loader, world_size=2)
    assert (horizons.batches_per_epoch, horizons.steps_per_epoch, horizons.total_steps) == (10, 4, 8)


def test_data_without_a_length_needs_max_steps():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from range(10)

    with pytest.raises(ConfigError, match="max_steps"):
        compute_horizons(TrainConfig(), Stream())
    horizons = compute_horizons(TrainConfig(max_steps=7, warmup_ratio=0.3), Stream())
    assert (horizons.steps_per_epoch, horizons.total_steps, horizons.warmup_steps) == (None, 7, 3)


def test_an_empty_training_set_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        compute_horizons(TrainConfig(), torch.utils.data.TensorDataset(torch.zeros(0, 1)))
