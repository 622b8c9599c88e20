"""The LR finder: a sane suggestion on digits, the user's model, RNG and run directory untouched, divergence
stops the sweep, and the suggestion rule itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from steadyfit import TrainConfig
from steadyfit.config import ConfigError
from steadyfit.lr_finder import find_lr, lr_find_command, suggest_lr

pytest.importorskip("sklearn")


def test_digits_suggestion_is_sane_and_the_model_is_untouched(tmp_path):
    from steadyfit.recipes.digits import build_model, load_digits_tensors

    torch.manual_seed(0)
    model = build_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    train_data, _ = load_digits_tensors()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()

    config = TrainConfig(run_dir=str(tmp_path / "unused"), batch_size=32, optimizer="adamw", device="cpu")
    result = find_lr(
        model,
        train_data,
        loss_fn=torch.nn.functional.cross_entropy,
        config=config,
        num_steps=100,
        plot_path=tmp_path / "sweep.png",
    )

    assert 1e-4 <= result.suggestion <= 1e-1, result.suggestion
    # AdamW at lr=10 diverges: the sweep stops before its last step.
    assert result.stopped_early and len(result.losses) < 100
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses)
    assert result.lrs[0] == pytest.approx(1e-7)
    assert all(later > earlier for earlier, later in zip(result.lrs, result.lrs[1:], strict=False))
    assert min(result.smoothed_losses) < 0.9 * result.smoothed_losses[0]  # the sweep really trained
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG stream moved"
    assert not (tmp_path / "unused").exists()
    with open(result.plot_path, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lr_find_command_leaves_the_run_directory_empty_but_for_the_plot(tmp_path):
    run_dir = tmp_path / "run"
    result = lr_find_command("digits", [f"run_dir={run_dir}", "batch_size=64"], num_steps=40, max_lr=1.0)
    # .lock: the sweep held the run directory's lock, as every writer does; the file stays (see RunLock).
    assert sorted(path.name for path in run_dir.iterdir()) == [".lock", "lr_find.png"]
    assert result.plot_path == str(run_dir / "lr_find.png")
    assert len(result.losses) <= 40 and result.suggestion is not None
    assert result.summary().startswith(f"lr-find: suggested lr {result.suggestion:.2e} (")
    assert result.summary().endswith(f"plot: {run_dir / 'lr_find.png'}")


def test_lr_find_command_reports_bad_arguments_as_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        lr_find_command("digits", [f"run_dir={tmp_path}", "batch_size=0"])
    with pytest.raises(ConfigError, match="num_steps"):
        lr_find_command("digits", [f"run_dir={tmp_path}"], num_steps=1)
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_sweep_stops_early():
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    data = TensorDataset(inputs, inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]))
    config = TrainConfig(batch_size=16, optimizer="sgd", device="cpu")

    def mse(outputs, targets):
        return torch.nn.functional.mse_loss(outputs.squeeze(-1), targets)

    result = find_lr(
        torch.nn.Linear(4, 1), data, loss_fn=mse, config=config, min_lr=1e-3, max_lr=1e3, num_steps=60
    )
    assert result.stopped_early and len(result.losses) < 60
    assert result.plot_path is None


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"min_lr": 1.0, "max_lr": 0.1}, "min_lr"),
        ({"num_steps": 2}, "num_steps"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
    ],
)
def test_bad_sweep_arguments_name_the_argument(arguments, field):
    with pytest.raises(ValueError, match=field):
        find_lr(torch.nn.Linear(2, 1), TensorDataset(torch.zeros(4, 2), torch.zeros(4)), **arguments)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10.0 ** (k / 4 - 6) for k in range(21)]  # 1e-6 .. 1e-1
    # Flat, then a sharp drop between points 8 and 9, a gentle one after, then the minimum at 14.
    losses = [2.0] * 8 + [1.9, 1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 1.5, 3.0, 6.0, 9.0, 12.0, 20.0]
    assert suggest_lr(lrs, losses) == lrs[8]


def test_suggestion_falls_back_to_a_tenth_of_the_minimum():
    lrs = [1e-3, 1e-2, 1e-1, 1.0]
    assert suggest_lr(lrs, [1.0, 0.5, 2.0, 9.0]) == pytest.approx(1e-3)
    assert suggest_lr([], []) is None
    assert suggest_lr(lrs, [math.nan] * 4) is None


def _regression():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 6, generator=generator)
    return TensorDataset(inputs, inputs.sum(dim=1, keepdim=True))


def _sweep(train_data, **arguments):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    config = TrainConfig(batch_size=8, optimizer="sgd", **arguments.pop("config", {}))
    return find_lr(
        model,
        train_data,
        loss_fn=torch.nn.functional.mse_loss,
        config=config,
        num_steps=12,
        max_lr=0.1,
        **arguments,
    )


def test_an_optimizer_factory_sweeps_from_min_lr_whatever_lr_it_builds_with():
    # A factory's own lr (SGD's 1e-3 here) must not multiply the sweep: the reported lrs are what ran.
    from_config = _sweep(_regression())
    from_factory = _sweep(_regression(), optimizer=torch.optim.SGD)
    assert from_factory.losses == from_config.losses
    assert from_factory.lrs == from_config.lrs


def test_the_sweep_leaves_a_user_loaders_generator_and_deterministic_mode_as_it_found_them():
    generator = torch.Generator().manual_seed(5)
    loader = torch.utils.data.DataLoader(_regression(), batch_size=8, shuffle=True, generator=generator)
    before = generator.get_state()
    assert not torch.are_deterministic_algorithms_enabled()
    _sweep(loader, config={"deterministic": True})
    assert torch.equal(generator.get_state(), before), "the loader's next epoch would draw another order"
    assert not torch.are_deterministic_algorithms_enabled()
