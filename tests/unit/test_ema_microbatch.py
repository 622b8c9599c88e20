"""EMA of the weights, and out-of-memory-adaptive micro-batches that keep the result."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, Trainer
from steadyfit.accumulation import WindowBackward
from steadyfit.precision import Precision

CE = torch.nn.functional.cross_entropy


def test_ema_matches_a_hand_computed_average(tmp_path):
    decay = 0.8
    history = []

    class Record(Callback):
        def on_step_end(self, trainer, state):
            history.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})

    data = make_regression(40)
    config = base_config(tmp_path, batch_size=8, ema_decay=decay, lr=0.1, max_epochs=2)
    trainer = Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, callbacks=[Record()])
    result = trainer.fit()
    expected = dict(history[0])
    for weights in history[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    averaged = dict(trainer.ema.module.named_parameters())
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    assert "ema_eval_loss" in result.metrics
    final_ema = load_file(str(tmp_path / "run" / "final" / "ema.safetensors"))
    torch.testing.assert_close(final_ema["0.weight"], expected["0.weight"], rtol=1e-5, atol=1e-6)


class Limited(torch.nn.Module):
    """Raises out-of-memory above a batch of 4, like a GPU that is too small."""

    def __init__(self):
        super().__init__()
        self.inner = make_mlp()
        self.largest = 0

    def forward(self, inputs):
        if inputs.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.largest = max(self.largest, inputs.shape[0])
        return self.inner(inputs)


def test_oom_adaptive_micro_batches_give_the_same_weights(tmp_path):
    data = make_regression(48)
    reference = make_mlp()
    config = base_config(tmp_path / "ref", batch_size=16, optimizer="sgd", lr=0.1, max_epochs=2)
    Trainer(reference, config, train_data=data, loss_fn=CE).fit()

    model = Limited()
    config = base_config(
        tmp_path / "auto", batch_size=16, optimizer="sgd", lr=0.1, max_epochs=2, micro_batch_size="auto"
    )
    trainer = Trainer(model, config, train_data=data, loss_fn=CE)
    result = trainer.fit()
    assert result.global_step == 6 and trainer.backward.micro_limit == 4 and model.largest == 4
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.inner.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_oom_without_auto_is_raised(tmp_path):
    config = base_config(tmp_path, batch_size=16)
    with pytest.raises(torch.OutOfMemoryError):
        Trainer(Limited(), config, train_data=make_regression(32), loss_fn=CE).fit()


class TwoRanksStub:
    """What WindowBackward asks of a process group, as rank 1 of 2 sees it (no group needed)."""

    is_distributed = True
    rank = 1
    world_size = 2

    def gradient_sync(self, model, last):
        return contextlib.nullcontext()


def test_oom_under_several_ranks_stops_with_the_size_to_ask_for_instead_of_halving_alone():
    # The other ranks wait in this window's collectives: halving on one rank alone would pair its passes
    # with theirs wrongly (a hang, or a collective mismatch under FSDP).
    model = Limited()
    backward = WindowBackward(
        model,
        CE,
        Precision("fp32", torch.device("cpu")),
        TwoRanksStub(),
        list(model.parameters()),
        micro_batch_size="auto",
    )
    inputs, targets = make_regression(12).tensors
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"micro-batches of 12 on rank 1: under 2 ranks .* rerun with micro_batch_size=6",
    ):
        backward.run([(inputs, targets)], [12])
    assert backward.micro_limit is None and model.largest == 0
