"""Optimizers: each trains, resumes exactly, matches plain torch, and leaves 1-dim parameters undecayed."""

from __future__ import annotations

import copy
import functools
import sys
import typing

import pytest
import torch

from steadyfit.config import TrainConfig
from steadyfit.optim import OPTIMIZER_FACTORIES, build_optimizer, param_groups, resolve_optimizer

# Per optimizer: config values that make a small regression converge in 50 steps.
SETTINGS = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 3e-2},
    "adamw": {"lr": 3e-2, "weight_decay": 0.01},
    "adafactor": {"lr": 3e-2},
    "lamb": {"lr": 3e-2},
    "lion": {"lr": 3e-2, "betas": (0.9, 0.99)},
}
EXTRA_OPTIMIZERS = ("lamb", "lion")


def _require_extra(name: str) -> None:
    if name in EXTRA_OPTIMIZERS:
        pytest.importorskip("pytorch_optimizer")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 4, generator=generator)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return inputs, targets


def _loss(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    inputs, targets = data
    return torch.nn.functional.mse_loss(model(inputs), targets)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    data = _data()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, data).backward()
        optimizer.step()


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise_equal(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert torch.equal(a, b), f"max difference {(a - b).abs().max().item()}"


def test_registry_covers_every_config_choice() -> None:
    assert set(OPTIMIZER_FACTORIES) == set(typing.get_args(TrainConfig.model_fields["optimizer"].annotation))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_optimizer_reduces_regression_loss(name: str) -> None:
    _require_extra(name)
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, **SETTINGS[name]))
    before = _loss(model, _data()).item()
    _train(model, optimizer, steps=50)
    after = _loss(model, _data()).item()
    assert after < 0.1 * before, f"{name}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_state_dict_round_trip_continues_bitwise(name: str) -> None:
    _require_extra(name)
    config = TrainConfig(optimizer=name, **SETTINGS[name])
    model = _model()
    optimizer = build_optimizer(model, config)
    _train(model, optimizer, steps=5)

    restored_model = _model(seed=123)
    restored_model.load_state_dict(copy.deepcopy(model.state_dict()))
    restored = build_optimizer(restored_model, config)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    _train(model, optimizer, steps=5)
    _train(restored_model, restored, steps=5)
    _assert_bitwise_equal(_weights(model), _weights(restored_model))


def _plain_torch_optimizer(name: str, model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """What a user writes by hand, with each library's own default implementation choice."""
    params = model.parameters()
    if name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    # Adam and AdamW are built on torch's fused kernel (its found_inf hook keeps the non-finite check on the
    # device): the hand-written twin asks for the same kernel.
    if name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0, fused=True
        )
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=config.lr)
    import pytorch_optimizer

    if name == "lamb":
        return pytorch_optimizer.Lamb(params, lr=config.lr, betas=config.betas, eps=config.eps)
    return pytorch_optimizer.Lion(params, lr=config.lr, betas=config.betas)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_matches_plain_optimizer_bitwise_without_weight_decay(name: str) -> None:
    _require_extra(name)
    config = TrainConfig(optimizer=name, **{**SETTINGS[name], "weight_decay": 0.0})
    ours, reference = _model(), _model()
    _train(ours, build_optimizer(ours, config), steps=20)
    _train(reference, _plain_torch_optimizer(name, reference, config), steps=20)
    _assert_bitwise_equal(_weights(ours), _weights(reference))


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_is_bitwise_plain_torch_sgd_with_the_same_state_layout(momentum: float, nesterov: bool) -> None:
    config = TrainConfig(optimizer="sgd", lr=0.05, momentum=momentum, nesterov=nesterov)
    ours, reference = _model(), _model()
    ours_optimizer = build_optimizer(ours, config)
    reference_optimizer = torch.optim.SGD(
        reference.parameters(), lr=0.05, momentum=momentum, nesterov=nesterov
    )
    _train(ours, ours_optimizer, steps=20)
    _train(reference, reference_optimizer, steps=20)
    _assert_bitwise_equal(_weights(ours), _weights(reference))

    # Same parameter indices and buffers: a state_dict of either loads into the other.
    ours_state, reference_state = ours_optimizer.state_dict(), reference_optimizer.state_dict()
    assert [g["params"] for g in ours_state["param_groups"]] == [
        g["params"] for g in reference_state["param_groups"]
    ]
    assert ours_state["state"].keys() == reference_state["state"].keys()
    for index, buffers in reference_state["state"].items():
        for key, value in buffers.items():
            assert value is None or torch.equal(ours_state["state"][index][key], value), (index, key)


def test_weight_decay_groups_split_by_dimension() -> None:
    model = _model()
    groups = param_groups(model, weight_decay=0.1)
    by_decay = {group["weight_decay"]: group["params"] for group in groups}
    assert set(by_decay) == {0.1, 0.0}
    assert all(p.ndim >= 2 for p in by_decay[0.1])
    assert all(p.ndim < 2 for p in by_decay[0.0])
    assert len(by_decay[0.1]) + len(by_decay[0.0]) == len(list(model.parameters()))


def test_no_split_without_weight_decay_keeps_model_order() -> None:
    model = _model()
    groups = param_groups(model, weight_decay=0.0)
    assert len(groups) == 1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_weight_decay_leaves_biases_and_norm_weights_alone(name: str) -> None:
    _require_extra(name)
    model = _model()
    optimizer = build_optimizer(model, TrainConfig(optimizer=name, lr=0.1, weight_decay=0.5))
    before = _weights(model)
    # Zero gradients: any change comes from weight decay alone.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for old, new in zip(before, model.parameters(), strict=True):
        if new.ndim < 2:
            assert torch.equal(old, new), f"{name} decayed a {new.ndim}-dim parameter"
        else:
            assert new.norm() < old.norm(), f"{name} did not decay a {new.ndim}-dim parameter"


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_group_added_later_gets_the_configs_values_not_the_optimizers_own(name: str, weight_decay: float):
    # An unfreezing callback's add_param_group takes the defaults: AdamW's own weight decay is 0.01.
    _require_extra(name)
    config = TrainConfig(optimizer=name, lr=0.1, weight_decay=weight_decay, betas=(0.8, 0.9), eps=1e-6)
    optimizer = build_optimizer(_model(), config)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})
    added = optimizer.param_groups[-1]
    assert added["weight_decay"] == weight_decay and added["lr"] == 0.1
    if name not in ("sgd", "adafactor"):  # Adafactor's decay and eps are its own
        assert tuple(added["betas"]) == (0.8, 0.9)
    if name in ("adam", "adamw", "lamb"):
        assert added["eps"] == 1e-6


def test_frozen_parameters_are_left_out() -> None:
    model = _model()
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model[0].weight) not in optimized


def test_model_without_trainable_parameters_is_refused() -> None:
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model, TrainConfig())


@pytest.mark.parametrize("name", EXTRA_OPTIMIZERS)
def test_missing_extra_names_the_install_command(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(ImportError, match=r"pip install steadyfit\[optim\]") as error:
        build_optimizer(_model(), TrainConfig(optimizer=name))
    assert f"optimizer={name}" in str(error.value)


def test_resolve_without_argument_builds_from_config() -> None:
    optimizer = resolve_optimizer(_model(), TrainConfig(optimizer="adam", lr=0.02), None)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.02


def test_resolve_returns_a_user_optimizer_unchanged() -> None:
    model = _model()
    mine = torch.optim.RMSprop(model.parameters(), lr=0.01)
    assert resolve_optimizer(model, TrainConfig(), mine) is mine


def test_resolve_calls_a_factory_with_the_trainable_parameters() -> None:
    model = _model()
    model[0].requires_grad_(False)
    optimizer = resolve_optimizer(model, TrainConfig(), functools.partial(torch.optim.SGD, lr=0.3))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.3
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(p) for p in model.parameters() if p.requires_grad
    ]


def test_resolve_passes_the_model_to_a_factory_that_asks_for_it() -> None:
    model = _model()
    received = []

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        received.append(model)
        return torch.optim.Adam(model[-1].parameters())

    optimizer = resolve_optimizer(model, TrainConfig(), make)
    assert received == [model]
    assert isinstance(optimizer, torch.optim.Adam)


def test_resolve_accepts_an_optimizer_class() -> None:
    optimizer = resolve_optimizer(_model(), TrainConfig(), torch.optim.Adagrad)
    assert isinstance(optimizer, torch.optim.Adagrad)


def test_resolve_refuses_what_is_not_an_optimizer() -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"expected None, a torch\.optim\.Optimizer"):
        resolve_optimizer(model, TrainConfig(), "adam")
    with pytest.raises(TypeError, match="factory returned list"):
        resolve_optimizer(model, TrainConfig(), list)


def test_resolve_refuses_an_optimizer_over_another_model() -> None:
    model, other = _model(), _model()
    with pytest.raises(ValueError, match="not parameters of the model"):
        resolve_optimizer(model, TrainConfig(), torch.optim.SGD(other.parameters(), lr=0.1))
