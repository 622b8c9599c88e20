"""The `digits` recipe: scikit-learn's bundled 8x8 handwritten digits (no download), a small MLP."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.metrics import accuracy
from steadyfit.recipes import Recipe

# The split is fixed (not config.seed) so every run is evaluated on the same 360 images.
SPLIT_SEED = 0
EVAL_FRACTION = 0.2


def load_digits_tensors() -> tuple[TensorDataset, TensorDataset]:
    """Train and eval sets: pixels scaled to [0, 1], a fixed seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("recipe digits: needs scikit-learn; pip install 'steadyfit[recipes]'") from None
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(SPLIT_SEED))
    num_eval = int(len(targets) * EVAL_FRACTION)
    eval_index, train_index = order[:num_eval], order[num_eval:]
    return (
        TensorDataset(inputs[train_index], targets[train_index]),
        TensorDataset(inputs[eval_index], targets[eval_index]),
    )


def build_model(hidden: int = 256, dropout: float = 0.1) -> nn.Module:
    """A two-hidden-layer MLP over the 64 pixels."""
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def build(config: TrainConfig) -> Recipe:
    """Model, data, loss and accuracy metric for the digits recipe.

    Example:
        >>> recipe = build(TrainConfig())
        >>> len(recipe.train_data), len(recipe.eval_data)
        (1438, 359)
    """
    train_data, eval_data = load_digits_tensors()
    return Recipe(
        model=build_model(),
        train_data=train_data,
        eval_data=eval_data,
        loss_fn=nn.functional.cross_entropy,
        metrics={"accuracy": accuracy},
    )
