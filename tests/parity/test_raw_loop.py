"""The Trainer with plain SGD is bitwise the hand-written loop of bench/raw_loop.py on CPU."""

from __future__ import annotations

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from raw_loop import raw_loop, tensor_batches
from steadyfit import Trainer
from steadyfit.data import epoch_permutation


@pytest.mark.parametrize(("momentum", "clip"), [(0.0, None), (0.9, 0.5)])
def test_trainer_equals_raw_loop_bitwise(tmp_path, momentum, clip):
    data = make_regression(70)
    inputs, targets = data.tensors
    seed, batch_size, lr = 3, 8, 0.05

    reference = make_mlp(dropout=0.2)
    torch.manual_seed(seed)  # the Trainer seeds torch at fit(): the same dropout stream
    raw_loop(
        reference,
        lambda epoch: tensor_batches(inputs, targets, batch_size, epoch_permutation(len(data), seed, epoch)),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(reference.parameters(), lr=lr, momentum=momentum),
        max_epochs=3,
        max_grad_norm=clip,
    )

    model = make_mlp(dropout=0.2)
    config = base_config(
        tmp_path,
        seed=seed,
        optimizer="sgd",
        lr=lr,
        momentum=momentum,
        batch_size=batch_size,
        max_epochs=3,
        max_grad_norm=clip,
    )
    Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy).fit()

    for (name, expected), actual in zip(
        reference.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), f"{name} is not bitwise equal to the raw loop"


def test_deterministic_runs_are_bitwise_identical(tmp_path):
    data = make_regression(40)
    weights = []
    for name in ("a", "b"):
        model = make_mlp(dropout=0.3)
        config = base_config(tmp_path / name, deterministic=True, batch_size=8, max_epochs=2, lr=0.01)
        Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy).fit()
        weights.append(model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
