"""Mixed precision on CPU: bf16 and fp16 (with loss scaling) train digits about as well as fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steadyfit import NonFiniteError, TrainConfig, Trainer, seed_everything
from steadyfit.recipes import digits


def _digits_accuracy(tmp_path, precision):
    seed_everything(0)
    recipe = digits.build(TrainConfig())
    config = TrainConfig(
        run_dir=str(tmp_path / precision),
        precision=precision,
        max_epochs=6,
        batch_size=32,
        lr=0.003,
        scheduler="cosine",
        progress=False,
        log_every=0,
        eval_every=0,
    )
    trainer = Trainer(
        recipe.model,
        config,
        train_data=recipe.train_data,
        eval_data=recipe.eval_data,
        loss_fn=recipe.loss_fn,
        metrics=recipe.metrics,
    )
    trainer.fit()
    return trainer.evaluate()["eval_accuracy"], trainer


@pytest.mark.slow
def test_bf16_and_fp16_reach_95_percent_of_fp32(tmp_path):
    fp32, _ = _digits_accuracy(tmp_path, "fp32")
    bf16, _ = _digits_accuracy(tmp_path, "bf16")
    fp16, trainer = _digits_accuracy(tmp_path, "fp16")
    assert fp32 > 0.9
    assert bf16 >= 0.95 * fp32
    assert fp16 >= 0.95 * fp32
    assert trainer.precision.scaler is not None and trainer.precision.loss_scale() > 0


def test_fp16_overflow_is_a_counted_scaler_skip(tmp_path):
    from helpers import base_config, make_mlp, make_regression, metric_rows

    data = make_regression(40)
    model = make_mlp()
    calls = []

    def overflow_once(grad):
        calls.append(1)
        return grad * float("inf") if len(calls) == 2 else grad

    model[0].weight.register_hook(overflow_once)
    config = base_config(tmp_path, precision="fp16", batch_size=4, max_epochs=1)
    trainer = Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy)
    scale_before = trainer.precision.loss_scale()
    result = trainer.fit()
    assert trainer.state.scaler_skips == 1 and result.global_step == 9
    summary = metric_rows(Path(config.run_dir))[-1]
    assert result.scaler_skips == 1 and summary["kind"] == "summary" and summary["scaler_skips"] == 1
    assert trainer.precision.loss_scale() == scale_before / 2  # halved once, never grown in 9 steps
    for value in model.state_dict().values():
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_fp16_overflow_below_the_smallest_loss_scale_is_a_non_finite_gradient(tmp_path, policy):
    # A gradient that overflows at every scale: the scaler halves 65536 (2**16) down to float16's smallest
    # normal number (2**-14), 31 skips, then halving cannot help. Counted as scaler skips forever, the run
    # would train nothing and end "done".
    from helpers import base_config, make_mlp, make_regression

    model = make_mlp()
    model[0].weight.register_hook(lambda grad: grad * float("inf"))
    config = base_config(
        tmp_path, precision="fp16", batch_size=1, max_epochs=1, on_nonfinite=policy, max_consecutive_skips=2
    )
    trainer = Trainer(
        model, config, train_data=make_regression(40), loss_fn=torch.nn.functional.cross_entropy
    )
    with pytest.raises(NonFiniteError) as stopped:
        trainer.fit()
    assert trainer.state.scaler_skips == 31 and trainer.state.step == 0
    assert trainer.state.nonfinite_skips == (3 if policy == "skip" else 0)
    assert ("3 consecutive" if policy == "skip" else "non-finite loss or gradient at step 1") in str(
        stopped.value
    )


def test_fp16_overflow_that_a_loss_scale_below_1_fixes_is_the_scalers_skip(tmp_path):
    # d loss / d weight is 2e5 in float16 terms: it overflows down to a scale of 0.5 and fits at 0.25.
    from helpers import base_config

    def loss_fn(outputs, targets):
        return (outputs.float().squeeze(-1) * 1000).mean() + 0 * targets.sum()

    data = torch.utils.data.TensorDataset(torch.full((64, 1), 200.0), torch.zeros(64))
    config = base_config(
        tmp_path,
        precision="fp16",
        batch_size=64,
        max_steps=5,
        max_epochs=None,
        optimizer="sgd",
        lr=1e-9,
        on_nonfinite="raise",
    )
    trainer = Trainer(torch.nn.Linear(1, 1, bias=False), config, train_data=data, loss_fn=loss_fn)
    result = trainer.fit()
    assert result.global_step == 5 and result.nonfinite_skips == 0
    assert result.scaler_skips == 18 and trainer.precision.loss_scale() == 0.25
