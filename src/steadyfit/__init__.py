"""steadyfit: a PyTorch training loop you can trust — exact, resumable, fast.

Example:
    >>> from steadyfit import Trainer, TrainConfig
    >>> config = TrainConfig(run_dir="runs/demo", max_epochs=3, batch_size=64, lr=3e-4)
"""

from steadyfit.callbacks import Callback
from steadyfit.checkpoint import CheckpointError, RunLockedError
from steadyfit.config import ConfigError, TrainConfig
from steadyfit.data import BatchError
from steadyfit.guard import NonFiniteError
from steadyfit.loggers.base import Logger, LoggerProtocol
from steadyfit.metrics import accuracy
from steadyfit.recipes import Recipe
from steadyfit.rng import seed_everything
from steadyfit.signals import Preempted
from steadyfit.state import FitResult, TrainState
from steadyfit.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "BatchError",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "FitResult",
    "Logger",
    "LoggerProtocol",
    "NonFiniteError",
    "Preempted",
    "Recipe",
    "RunLockedError",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "accuracy",
    "seed_everything",
]
