"""Guarantee 7: a non-finite loss or gradient never reaches the weights: skipped and counted, or raised."""

from __future__ import annotations

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, NonFiniteError, Trainer

CE = torch.nn.functional.cross_entropy


class Snapshots(Callback):
    def __init__(self):
        self.by_step = {}

    def on_step_end(self, trainer, state):
        self.by_step[state.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def nan_on_calls(bad_calls):
    calls = []

    def loss_fn(outputs, targets):
        calls.append(1)
        loss = CE(outputs, targets)
        return loss * float("nan") if len(calls) in bad_calls else loss

    return loss_fn


def test_nan_loss_is_skipped_weights_untouched(tmp_path):
    data = make_regression(40)
    snapshots = Snapshots()
    config = base_config(tmp_path, batch_size=4, scheduler="linear", lr=0.1, max_epochs=1)
    trainer = Trainer(make_mlp(), config, train_data=data, loss_fn=nan_on_calls({4}), callbacks=[snapshots])
    before_skip = {}

    class Capture(Callback):
        def on_step_end(self, trainer, state):
            if state.step == 3:
                before_skip.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.callbacks = type(trainer.callbacks)([snapshots, Capture()])
    result = trainer.fit()
    assert result.global_step == 9  # 10 windows, one skipped
    assert result.nonfinite_skips == 1 and trainer.state.nonfinite_skips == 1
    assert trainer.scheduler.last_epoch == 9
    # The weights after step 3 are what step 4 started from: the skipped window changed nothing.
    for key, value in before_skip.items():
        assert torch.equal(value, snapshots.by_step[3][key])
    for value in trainer.model.state_dict().values():
        assert torch.isfinite(value).all()


def test_skip_leaves_the_optimizer_state_untouched(tmp_path):
    data = make_regression(40)
    config = base_config(tmp_path / "a", batch_size=4, lr=0.1, optimizer="adamw", max_epochs=1)
    trainer = Trainer(make_mlp(), config, train_data=data, loss_fn=nan_on_calls({2, 7}))
    assert trainer.fit().global_step == 8
    for state in trainer.optimizer.state.values():
        assert int(state["step"]) == 8, "AdamW counted a skipped step"
        assert torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_inf_in_one_gradient_element_is_caught(tmp_path, clip):
    data = make_regression(40)
    model = make_mlp()
    calls = []

    def poison(grad):
        calls.append(1)
        if len(calls) == 3:
            grad = grad.clone()
            grad[0, 0] = float("inf")
        return grad

    model[0].weight.register_hook(poison)
    config = base_config(tmp_path, batch_size=4, lr=0.1, max_grad_norm=clip, max_epochs=1)
    trainer = Trainer(model, config, train_data=data, loss_fn=CE)
    result = trainer.fit()
    assert result.nonfinite_skips == 1 and result.global_step == 9
    for value in model.state_dict().values():
        assert torch.isfinite(value).all(), "an inf gradient reached the weights"


def test_raise_names_step_epoch_and_batch(tmp_path):
    data = make_regression(40)
    config = base_config(tmp_path, batch_size=4, on_nonfinite="raise", max_epochs=1)
    with pytest.raises(NonFiniteError, match=r"step 5, epoch 0, batch 4 of the epoch"):
        Trainer(make_mlp(), config, train_data=data, loss_fn=nan_on_calls({5})).fit()


def test_consecutive_skip_limit_stops_training(tmp_path):
    data = make_regression(80)
    config = base_config(tmp_path, batch_size=4, max_consecutive_skips=3, max_epochs=1)
    with pytest.raises(NonFiniteError, match=r"4 consecutive optimizer steps"):
        Trainer(make_mlp(), config, train_data=data, loss_fn=nan_on_calls(set(range(3, 100)))).fit()


def test_a_raise_after_an_improving_evaluation_commits_and_names_the_best_checkpoint(tmp_path):
    # save_every=0: an improving evaluation's checkpoint is held in memory until the next save point. An
    # error before that point must commit it, name it, and let the rerun resume from it, not from step 0.
    data = make_regression(80)
    settings = {"batch_size": 4, "eval_every": 5, "save_every": 0, "on_nonfinite": "raise"}
    training_calls = []

    def nan_from_step_8(outputs, targets):
        loss = CE(outputs, targets)
        if torch.is_grad_enabled():  # training, not the evaluation
            training_calls.append(1)
        return loss * float("nan") if len(training_calls) >= 8 else loss

    trainer = Trainer(
        make_mlp(),
        base_config(tmp_path, **settings),
        train_data=data,
        eval_data=data,
        loss_fn=nan_from_step_8,
    )
    best = tmp_path / "run" / "checkpoints" / "step-00000005"
    with pytest.raises(NonFiniteError, match=rf"step 8, .*; last good checkpoint: {best}$"):
        trainer.fit()
    assert trainer.state.best_checkpoint == str(best)
    assert (best / "manifest.json").is_file(), "the held best checkpoint was lost to the error"

    started_at = []

    class StartedAt(Callback):
        def on_fit_start(self, trainer, state):
            started_at.append(state.step)

    config = base_config(tmp_path, **settings, max_steps=6, max_epochs=None)
    rerun = Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, callbacks=[StartedAt()])
    assert rerun.fit().global_step == 6 and started_at == [5]
