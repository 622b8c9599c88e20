"""Small deterministic models, data and configs for the tests."""

from __future__ import annotations

from pathlib import Path

import torch


def make_regression(n: int = 50, features: int = 6, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    targets = torch.randint(0, 3, (n,), generator=generator)
    return torch.utils.data.TensorDataset(inputs, targets)


def make_mlp(features: int = 6, classes: int = 3, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, 16),
        torch.nn.Tanh(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(16, classes),
    )


def base_config(tmp_path: Path, **overrides):
    from steadyfit import TrainConfig

    values = {"run_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "max_epochs": 1}
    values.update(overrides)
    return TrainConfig(**values)
