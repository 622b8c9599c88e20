"""The learning-rate finder: an exponential LR sweep on a copy of the model, its plot and a suggested LR.

The sweep is a short steadyfit run (same Trainer, so precision, accumulation, clipping and the loss
contract behave exactly as in training) in a temporary run directory, with the learning rate multiplied by
a constant factor each optimizer step from ``min_lr`` to ``max_lr``. The user's model, run directory and
random number generators are left as they were.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from steadyfit import data as data_mod
from steadyfit.callbacks import Callback
from steadyfit.config import ConfigError, TrainConfig, make_config
from steadyfit.guard import NonFiniteError
from steadyfit.layout import LR_FIND_FILE
from steadyfit.loggers.base import Logger
from steadyfit.rng import capture_rng, restore_rng
from steadyfit.signals import Preempted

if TYPE_CHECKING:
    from steadyfit.state import TrainState
    from steadyfit.trainer import Trainer

# Fields the sweep sets whatever the user's config says: a short, quiet, throw-away run with no evaluation,
# no checkpoints worth keeping and no external logger (an MLflow server must not receive a sweep).
_SWEEP_FIELDS: dict[str, Any] = {
    "max_epochs": None,
    "scheduler": "constant",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "eval_every": 0,
    "log_every": 1,
    "save_every": 0,
    "resume": "never",
    "loggers": [],
    "progress": False,
    "metric_for_best": None,
    "load_best_at_end": False,
    "early_stopping_patience": None,
    "ema_decay": None,
    "on_nonfinite": "raise",
    "diagnostics": False,
    "stop_on": [],
    "eval_on_start": False,
    "limit_eval_batches": None,
    "fast_dev_run": False,
}


@dataclass
class LRFinderResult:
    """What :func:`find_lr` returns.

    Attributes:
        lrs: the learning rate of each optimizer step of the sweep.
        losses: the training loss of each step (the loop's own window loss: exact under accumulation).
        smoothed_losses: the exponential moving average of ``losses`` (bias-corrected).
        suggestion: the suggested learning rate, or None when the sweep was too short to tell.
        plot_path: the loss-vs-LR PNG, or None when matplotlib is missing or no plot was asked for.
        stopped_early: True when the loss diverged before ``num_steps``.
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float | None
    plot_path: str | None
    stopped_early: bool

    def summary(self) -> str:
        """One line for people: the suggestion, the range swept and where the plot is."""
        if not self.lrs:
            return "lr-find: the sweep took no step"
        suggested = f"suggested lr {self.suggestion:.2e}" if self.suggestion is not None else "no suggestion"
        ending = "stopped when the loss diverged" if self.stopped_early else "ran to the end"
        swept = f"{len(self.lrs)} steps, lr {self.lrs[0]:.1e} to {self.lrs[-1]:.1e}"
        line = f"lr-find: {suggested} ({swept}, {ending})"
        if self.plot_path is not None:
            line += f"; plot: {self.plot_path}"
        return line


class _SweepRecorder(Callback, Logger):
    """Reads each step's train row and stops the sweep once the smoothed loss diverges."""

    def __init__(self, smoothing: float, diverge_factor: float) -> None:
        self.smoothing = smoothing
        self.diverge_factor = diverge_factor
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.average = 0.0
        self.diverged = False

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        # The train rows reach loggers (log_every=1: one row per optimizer step, loss already on the host).
        trainer.run_directory.add_logger(self)

    def log_row(self, row: dict[str, Any]) -> None:
        if row.get("kind") != "train":
            return
        loss = float(row["loss"])
        self.losses.append(loss)
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        # Bias correction: the average starts at 0, so early values would otherwise be far too low.
        self.smoothed.append(self.average / (1 - self.smoothing ** len(self.losses)))

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        if not self.smoothed:
            return
        current = self.smoothed[-1]
        if not math.isfinite(current) or current > self.diverge_factor * min(self.smoothed):
            self.diverged = True
            trainer.request_stop("lr-find: the loss diverged")


def find_lr(
    model: torch.nn.Module,
    train_data: Any,
    *,
    loss_fn: Callable[..., Any] | None = None,
    config: TrainConfig | dict[str, Any] | None = None,
    collate_fn: Callable[..., Any] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.9,
    diverge_factor: float = 4.0,
    plot_path: str | Path | None = None,
) -> LRFinderResult:
    """Sweep the learning rate exponentially from ``min_lr`` to ``max_lr`` on a copy of ``model``.

    Each of ``num_steps`` optimizer steps uses ``min_lr * (max_lr / min_lr) ** (k / (num_steps - 1))``. The
    sweep stops early when the smoothed loss exceeds ``diverge_factor`` times its best value (or is not
    finite). The suggestion is the learning rate where the smoothed loss falls fastest against log(LR),
    looked for between the first tenth of the sweep and the minimum of the smoothed loss; when that stretch
    is too short, it is a tenth of the learning rate at the minimum. Read the plot too: the suggestion is a
    starting point, usually a good one for a constant or warmup-then-decay schedule's peak LR.

    Args:
        model: the model; it is deep-copied, never modified.
        train_data: as for :class:`~steadyfit.Trainer`.
        loss_fn: as for the Trainer (None for models that return ``outputs.loss``).
        config: the run's config (batch size, optimizer, precision, accumulation, clipping...). Its ``lr``,
            scheduler, evaluation, logging and checkpoint fields are replaced for the sweep, and its
            ``run_dir`` is not used: the sweep runs in a temporary directory.
        collate_fn: as for the Trainer.
        optimizer: None (built from ``config``) or a factory as for the Trainer; an optimizer instance is
            refused, since it would hold the parameters of the original model.
        min_lr: the first learning rate.
        max_lr: the last learning rate.
        num_steps: optimizer steps in the sweep.
        smoothing: the moving-average factor in [0, 1) applied to the step losses.
        diverge_factor: stop when the smoothed loss exceeds this multiple of its best value.
        plot_path: where to write the loss-vs-LR PNG (needs matplotlib); None for no plot.

    Returns:
        An :class:`LRFinderResult`.

    Raises:
        ConfigError: (a ValueError) for a bad sweep argument; the message names it.
        TypeError: when ``optimizer`` is an optimizer instance.

    Example:
        >>> config = TrainConfig(batch_size=32, optimizer="adamw")
        >>> result = find_lr(model, train_ds, loss_fn=F.cross_entropy, config=config)  # doctest: +SKIP
        >>> result.suggestion  # doctest: +SKIP
        0.0023
    """
    _check_sweep_arguments(min_lr, max_lr, num_steps, smoothing, diverge_factor)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizer: pass a factory (e.g. functools.partial(torch.optim.AdamW)), not an instance"
        )
    base = config if isinstance(config, TrainConfig) else make_config(dict(config or {}))
    ratio = max_lr / min_lr
    recorder = _SweepRecorder(smoothing, diverge_factor)

    def exponential(step: int) -> float:
        return ratio ** (min(step, num_steps - 1) / (num_steps - 1))

    from steadyfit.trainer import Trainer

    def sweep_schedule(built: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # Every group starts at min_lr, whatever lr a user's factory gave it (as Lightning's finder does):
        # the schedule multiplies the groups' lrs, and the lrs reported are min_lr's sweep.
        for group in built.param_groups:
            group["lr"] = min_lr
        return torch.optim.lr_scheduler.LambdaLR(built, exponential)

    # fit() reseeds the global generators and draws from a user DataLoader's own: the caller's streams
    # must not change (fit() itself leaves torch's deterministic settings as it found them).
    streams = data_mod.capture_streams(train_data) if isinstance(train_data, DataLoader) else None
    rng_state = capture_rng()
    try:
        with tempfile.TemporaryDirectory(prefix="steadyfit-lr-find-") as run_dir:
            sweep_config = make_config(
                {
                    **base.model_dump(),
                    **_SWEEP_FIELDS,
                    "run_dir": run_dir,
                    "max_steps": num_steps,
                    "lr": min_lr,
                }
            )
            trainer = Trainer(
                copy.deepcopy(model),
                sweep_config,
                train_data=train_data,
                loss_fn=loss_fn,
                collate_fn=collate_fn,
                callbacks=[recorder],
                optimizer=optimizer,
                scheduler=sweep_schedule,
            )
            try:
                trainer.fit()
            except NonFiniteError:
                recorder.diverged = True  # a non-finite loss or gradient ends the sweep like divergence
            except Preempted as exc:
                # Its checkpoint lies in the directory about to be removed: there is nothing to resume.
                raise Preempted(exc.signum, None) from None
    finally:
        restore_rng(rng_state)
        if streams is not None:
            data_mod.restore_streams(train_data, streams)

    lrs = [min_lr * exponential(step) for step in range(len(recorder.losses))]
    suggestion = suggest_lr(lrs, recorder.smoothed)
    written = None
    if plot_path is not None:
        written = plot_lr_sweep(lrs, recorder.losses, recorder.smoothed, suggestion, plot_path)
    return LRFinderResult(
        lrs=lrs,
        losses=recorder.losses,
        smoothed_losses=recorder.smoothed,
        suggestion=suggestion,
        plot_path=written,
        stopped_early=recorder.diverged,
    )


def _check_sweep_arguments(
    min_lr: float, max_lr: float, num_steps: int, smoothing: float, diverge_factor: float
) -> None:
    # ConfigError (a ValueError): `steadyfit lr-find` reports these like any bad argument, with status 2.
    if not 0 < min_lr < max_lr < math.inf:
        raise ConfigError(
            f"min_lr / max_lr: need 0 < min_lr < max_lr, both finite, got {min_lr} and {max_lr}"
        )
    if num_steps < 3:
        raise ConfigError(f"num_steps: the sweep needs at least 3 steps, got {num_steps}")
    if not 0 <= smoothing < 1:
        raise ConfigError(f"smoothing: must be in [0, 1), got {smoothing}")
    if diverge_factor <= 1:
        raise ConfigError(f"diverge_factor: must be above 1, got {diverge_factor}")


def suggest_lr(lrs: list[float], smoothed_losses: list[float]) -> float | None:
    """The LR of steepest descent of the smoothed loss against log(LR), before its minimum.

    The first tenth of the sweep is left out (the loss barely moves there, and its slope is noise). When
    fewer than three points remain, a tenth of the LR at the minimum is returned; None for an empty sweep.

    Example:
        >>> suggest_lr([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.9, 1.0, 0.9, 5.0])
        0.001
    """
    finite = [i for i, loss in enumerate(smoothed_losses) if math.isfinite(loss)]
    if not finite:
        return None
    lowest = min(finite, key=lambda i: smoothed_losses[i])
    start = max(1, len(smoothed_losses) // 10)
    if lowest - start < 2:
        return lrs[lowest] / 10
    # Forward differences: the slope from point i to i+1 belongs to the LR where the descent starts.
    slopes = [
        (smoothed_losses[i + 1] - smoothed_losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(start, lowest)
    ]
    steepest = min(range(len(slopes)), key=lambda j: slopes[j])
    return lrs[start + steepest]


def plot_lr_sweep(
    lrs: list[float],
    losses: list[float],
    smoothed_losses: list[float],
    suggestion: float | None,
    path: str | Path,
) -> str | None:
    """Write the loss-vs-LR figure (log LR axis) as a PNG; returns its path, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            "steadyfit: lr-find plot skipped: needs matplotlib; pip install 'steadyfit[plot]'",
            file=sys.stderr,
        )
        return None
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe in threads and tests.
    figure = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss per step")
    axes.plot(lrs, smoothed_losses, color="tab:blue", linewidth=2, label="smoothed loss")
    if suggestion is not None:
        axes.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    axes.set_xscale("log")
    finite = [loss for loss in smoothed_losses if math.isfinite(loss)]
    if finite:
        # Divergence at the end would otherwise squash the interesting part of the curve.
        low = min(loss for loss in [*finite, *losses] if math.isfinite(loss))
        high = max(finite[0], min(max(finite), 2 * finite[0]))
        margin = 0.05 * (high - low or 1.0)
        axes.set_ylim(low - margin, high + margin)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title("steadyfit lr-find")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return str(path)


def lr_find_command(
    source: str | None,
    overrides: list[str] | dict[str, Any] = (),
    out: str | Path | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
) -> LRFinderResult:
    """``steadyfit lr-find``: resolve a recipe or config like ``steadyfit fit`` and sweep its model.

    The run directory gets nothing but the plot (default ``RUN_DIR/lr_find.png``): no config.yaml, no
    metrics.jsonl, no checkpoints, so a later ``steadyfit fit`` starts fresh. Its lock is held for the
    sweep when the plot goes there.

    Raises:
        ConfigError: for a bad recipe, file, override or sweep argument (as ``steadyfit fit``).
        RunLockedError: another run holds the run directory.

    Example:
        >>> result = lr_find_command("digits", ["batch_size=64"], num_steps=50)  # doctest: +SKIP
    """
    from steadyfit.assembly import prepare
    from steadyfit.checkpoint import RunLock
    from steadyfit.recipes import build_recipe
    from steadyfit.rundir import acquire_run_lock

    _check_sweep_arguments(min_lr, max_lr, num_steps, smoothing=0.9, diverge_factor=4.0)  # before any build
    recipe_name, config = prepare(source, overrides)
    run_dir = Path(config.run_dir)
    plot_path = Path(out) if out is not None else run_dir / LR_FIND_FILE
    # The plot is the run directory's only change, but a run directory has one writer: take its lock (before
    # the sweep, so a held one is refused at once) unless the plot goes elsewhere.
    lock = RunLock(run_dir)
    if plot_path.resolve().is_relative_to(run_dir.resolve()):
        acquire_run_lock(lock)
    try:
        # Seeded as `steadyfit fit` seeds it: the same initial model as a run with this config.
        recipe = build_recipe(recipe_name, config)
        return find_lr(
            recipe.model,
            recipe.train_data,
            loss_fn=recipe.loss_fn,
            config=config,
            collate_fn=recipe.collate_fn,
            min_lr=min_lr,
            max_lr=max_lr,
            num_steps=num_steps,
            plot_path=plot_path,
        )
    finally:
        lock.release()
