"""Guarantee 1: batch B with K accumulation steps performs the same updates as batch B*K."""

from __future__ import annotations

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Trainer


def _train(tmp_path, name, loss_fn, data, **overrides):
    model = make_mlp()
    values = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, **overrides}
    if values["optimizer"] != "sgd":
        values["momentum"] = 0.0
    config = base_config(tmp_path / name, **values)
    result = Trainer(model, config, train_data=data, loss_fn=loss_fn).fit()
    return model, result


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


@pytest.mark.parametrize("clip", [None, 0.05])
def test_mean_loss_with_short_last_batch(tmp_path, clip):
    # 50 samples, global batch 12: four full windows and a short one of 2 samples (micro-batches 4,4,4 / 2).
    data = make_regression(50)
    loss = torch.nn.functional.cross_entropy
    big, big_result = _train(tmp_path, "big", loss, data, batch_size=12, max_epochs=2, max_grad_norm=clip)
    small, small_result = _train(
        tmp_path, "small", loss, data, batch_size=4, grad_accum_steps=3, max_epochs=2, max_grad_norm=clip
    )
    assert big_result.global_step == small_result.global_step == 10
    _assert_same_weights(big, small)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mean_loss_over_a_window_of_unequal_micro_batches(tmp_path, optimizer):
    # 22 samples, global batch 12: windows of 4+4+4 and 4+4+2. A mean of the three micro-batch means would
    # weight the 2-sample micro-batch like the 4-sample ones; the sample-weighted mean equals batch 12.
    data = make_regression(22)
    loss = torch.nn.functional.cross_entropy
    settings = {"max_epochs": 3, "optimizer": optimizer, "lr": 0.1}
    big, _ = _train(tmp_path, "big", loss, data, batch_size=12, **settings)
    small, result = _train(tmp_path, "small", loss, data, batch_size=4, grad_accum_steps=3, **settings)
    assert result.global_step == 6
    _assert_same_weights(big, small)


def ragged_token_loss(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token-level loss with padding: a sample of class c carries c + 1 tokens, so micro-batches of equal
    sample count carry different token counts, and a mean of means would be wrong."""
    tokens = targets + 1
    per_sample = torch.nn.functional.cross_entropy(outputs, targets, reduction="none")
    return (per_sample * tokens).sum(), tokens.sum()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_sum_count_loss_normalised_by_window(tmp_path, clip):
    data = make_regression(50)
    big, _ = _train(tmp_path, "big", ragged_token_loss, data, batch_size=12, max_epochs=2, max_grad_norm=clip)
    small, _ = _train(
        tmp_path,
        "small",
        ragged_token_loss,
        data,
        batch_size=4,
        grad_accum_steps=3,
        max_epochs=2,
        max_grad_norm=clip,
    )
    _assert_same_weights(big, small)


def test_mean_of_means_would_differ(tmp_path):
    """The equivalence above is not vacuous: naive per-micro-batch averaging of the ragged loss differs."""
    data = make_regression(50)

    def naive(outputs, targets):
        total, count = ragged_token_loss(outputs, targets)
        return total / count

    big, _ = _train(tmp_path, "big", ragged_token_loss, data, batch_size=12, max_epochs=2)
    small, _ = _train(tmp_path, "small", naive, data, batch_size=4, grad_accum_steps=3, max_epochs=2)
    differences = [
        (a - b).abs().max().item() for a, b in zip(big.parameters(), small.parameters(), strict=True)
    ]
    assert max(differences) > 1e-4


def test_scheduler_and_step_advance_per_optimizer_step(tmp_path):
    data = make_regression(48)
    model = make_mlp()
    config = base_config(
        tmp_path,
        optimizer="sgd",
        lr=0.1,
        batch_size=4,
        grad_accum_steps=3,
        max_epochs=1,
        scheduler="linear",
        warmup_steps=0,
    )
    trainer = Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy)
    result = trainer.fit()
    assert result.global_step == 4  # 48 samples / (4 * 3)
    assert trainer.scheduler.last_epoch == 4
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay reached its end
