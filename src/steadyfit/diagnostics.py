"""Training diagnostics: read the logged rows and say, while the run goes, when it looks unhealthy.

Each check looks only at the numbers a logged row already carries (they are on the host: the logging step
paid for the read), so diagnostics add no synchronisation to the hot loop. A check reports its finding once,
the first time its condition holds; afterwards it stays silent for the rest of the run (the row in
metrics.jsonl and one console warning are enough to act on). docs/diagnostics.md documents every check.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.horizons import schedule_phases

# Default thresholds, overridable with ``diagnostic_thresholds={"check.param": value}``. Windows count
# logged rows (train rows every ``log_every`` steps; evaluations for overfitting, at_chance), not steps.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "divergence.window": 3,
    "divergence.factor": 2.0,
    "divergence.lost_fraction": 0.5,
    "plateau.window": 20,
    "plateau.min_improvement": 0.01,
    "plateau.still_high": 0.5,
    "at_chance.evals": 2,
    "at_chance.fraction": 1.0,
    "overfitting.evals": 3,
    "overfitting.min_rise": 0.1,
    "grad_spike.factor": 10.0,
    "grad_spike.min_history": 5,
    "grad_collapse.threshold": 1e-6,
    "grad_collapse.window": 3,
    "lr_schedule.tolerance": 0.01,
    "lr_schedule.window": 2,
    "throughput.factor": 0.2,
    "throughput.window": 3,
    "throughput.min_history": 5,
    "memory_growth.window": 10,
    "memory_growth.min_growth_mb": 20.0,
    "memory_growth.rising_fraction": 0.8,
    "warmup_missing.min_lr": 1e-3,
    "warmup_missing.early_steps": 200,
    "warmup_missing.loss_factor": 2.0,
    "warmup_missing.grad_factor": 20.0,
}

# The thresholds that count logged rows or evaluations.
_COUNTS = (".window", ".evals", ".min_history")

CHECKS: tuple[str, ...] = tuple(dict.fromkeys(key.split(".")[0] for key in DEFAULT_THRESHOLDS))

# Running medians look at this many recent values: enough to be robust, bounded in checkpoint size.
_HISTORY = 200

# State keys that checkpoints written before the at_chance check and the first-step baseline lack.
_ADDED_KEYS = frozenset({"first_step_loss", "chance_evals"})


def validate_diagnostics(stop_on: Iterable[str], thresholds: dict[str, float]) -> dict[str, float]:
    """Check ``stop_on`` names and ``diagnostic_thresholds`` keys; returns the merged thresholds.

    Raises:
        ConfigError: naming the unknown entry and the allowed ones.

    Example:
        >>> validate_diagnostics(["divergence"], {"plateau.window": 50})["plateau.window"]
        50
    """
    for name in stop_on:
        if name not in CHECKS:
            raise ConfigError(f"stop_on: unknown diagnostic {name!r}; allowed: {', '.join(CHECKS)}")
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in thresholds.items():
        if key not in DEFAULT_THRESHOLDS:
            raise ConfigError(
                f"diagnostic_thresholds: unknown key {key!r}; allowed keys: {', '.join(DEFAULT_THRESHOLDS)}"
            )
        if key.endswith(_COUNTS):
            # A count of rows or evaluations: 0 (or a fraction) would fire on the first row.
            if isinstance(value, bool) or not float(value).is_integer() or value < 1:
                raise ConfigError(
                    f"diagnostic_thresholds: {key} is a count (of logged rows or evaluations): a whole "
                    f"number >= 1, got {value!r}"
                )
            value = int(value)
        elif not math.isfinite(value) or value < 0:
            raise ConfigError(f"diagnostic_thresholds: {key} must be a finite number >= 0, got {value!r}")
        merged[key] = value
    return merged


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _push(history: list[float], value: float) -> None:
    history.append(value)
    del history[:-_HISTORY]


class Diagnostics:
    """Watches train and eval rows and returns findings (diagnostic rows) when a check fires.

    Args:
        config: the run's config (``stop_on``, ``diagnostic_thresholds``, the warm-up settings).
        total_steps: the planned number of optimizer steps, or None.

    Raises:
        ConfigError: for an unknown ``stop_on`` name or ``diagnostic_thresholds`` key.

    Example:
        >>> diagnostics = Diagnostics(TrainConfig(), total_steps=100)
        >>> diagnostics.observe({"kind": "train", "step": 10, "loss": float("nan")})[0]["diagnostic"]
        'divergence'
    """

    # A checkpoint of a run without diagnostics restores without them: the checks start afresh.
    optional_in_checkpoint = True

    def __init__(self, config: TrainConfig, total_steps: int | None) -> None:
        self.config = config
        self.total_steps = total_steps
        self.thresholds = validate_diagnostics(config.stop_on, config.diagnostic_thresholds)
        # Evaluations in the warm-up are not judged at_chance: the lr is small there by design.
        self.warmup_steps = schedule_phases(config, total_steps)[0]
        self.reported: dict[str, int] = {}
        # The loss of the run's first step alone (the first train row's ``first_step_loss``): the untrained
        # model's loss, the baseline of a run that goes wrong from its first window on.
        self.first_step_loss: float | None = None
        self.first_loss: float | None = None
        self.best_loss: float | None = None
        self.high_rows = 0
        self.best_at_row: list[float] = []
        self.grad_norms: list[float] = []
        self.first_grad_norm: float | None = None
        self.low_grad_rows = 0
        self.lr_off_rows = 0
        self.speeds: list[float] = []
        self.slow_rows = 0
        self.memory: list[float] = []
        self.last_nonfinite_skips = 0
        self.evals: list[dict[str, float]] = []
        self.chance_evals = 0
        self.last_train_loss: float | None = None

    def threshold(self, key: str) -> float:
        return self.thresholds[key]

    def observe(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Feed one logged row; returns the findings it triggers (each reported once per run)."""
        checks: tuple[Callable[[dict[str, Any]], dict[str, Any] | None], ...]
        if row.get("kind") == "train":
            checks = (
                self._warmup_missing,
                self._divergence,
                self._plateau,
                self._grad_spike,
                self._grad_collapse,
                self._lr_schedule,
                self._throughput,
                self._memory_growth,
            )
            loss = _finite(row.get("loss"))
            if loss is not None:
                self.last_train_loss = loss
            first_step_loss = _finite(row.get("first_step_loss"))
            if first_step_loss is not None:
                self.first_step_loss = first_step_loss
        elif row.get("kind") == "eval":
            checks = (self._overfitting, self._at_chance)
        else:
            return []
        findings = []
        # Every check runs on every row, reported or not, so its history stays the same as without resume.
        for check in checks:
            evidence = check(row)
            if evidence is None:
                continue
            name = check.__name__.lstrip("_")
            if name in self.reported:
                continue
            step = int(row.get("step", 0))
            self.reported[name] = step
            header = {"kind": "diagnostic", "step": step, "diagnostic": name, "first_seen": True}
            if "time_s" in row:
                header["time_s"] = row["time_s"]  # the finding is as old as the row that shows it
            findings.append(header | evidence)
        return findings

    # ------------------------------------------------------------------------------------- checks
    def _divergence(self, row: dict[str, Any]) -> dict[str, Any] | None:
        loss = _finite(row.get("loss"))
        skips = int(row.get("nonfinite_skips") or 0)
        new_skips = skips - self.last_nonfinite_skips
        self.last_nonfinite_skips = skips
        if loss is None and "loss" in row:
            return {
                "loss": None,
                "nonfinite_skips": skips,
                "message": f"divergence: the loss is not finite at step {row.get('step')}; "
                "lower lr, add max_grad_norm or warm-up, or check the data for NaN/inf",
            }
        if new_skips > 0:
            return {
                "loss": loss,
                "nonfinite_skips": skips,
                "message": f"divergence: {new_skips} step(s) skipped for a non-finite loss or gradient "
                f"before step {row.get('step')}; lower lr, add max_grad_norm, or check the data",
            }
        if loss is None:
            return None
        if self.first_loss is None:
            self.first_loss = loss
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        best, first = self.best_loss, self.first_loss
        # The first step's loss counts as the run's first loss: a run that blows up within its first logging
        # window has a first row as high as the rest, and only the first step shows where it started.
        start = self.first_step_loss
        if start is not None:
            best, first = min(best, start), start
        # High = above factor x best AND having lost a good part of the progress made since the start, so
        # tiny absolute wobbles of a converged loss near zero do not count.
        high = loss > self.threshold("divergence.factor") * best and loss - best > self.threshold(
            "divergence.lost_fraction"
        ) * max(first - best, 0.0)
        self.high_rows = self.high_rows + 1 if high else 0
        if self.high_rows < self.threshold("divergence.window"):
            return None
        since = "the first step's loss" if best == start else "its best"
        return {
            "loss": loss,
            "best_loss": best,
            "first_loss": first,
            "first_step_loss": start,
            "rows_high": self.high_rows,
            "message": f"divergence: loss {loss:.4g} rose above {best:.4g} ({since}) for {self.high_rows} "
            "logged rows; lower lr, add warm-up or max_grad_norm",
        }

    def _plateau(self, row: dict[str, Any]) -> dict[str, Any] | None:
        loss = _finite(row.get("loss"))
        if loss is None or self.first_loss is None:
            return None
        _push(self.best_at_row, self.best_loss)
        window = int(self.threshold("plateau.window"))
        if len(self.best_at_row) <= window:
            return None
        before, now = self.best_at_row[-window - 1], self.best_at_row[-1]
        improvement = (before - now) / abs(before) if before else 0.0
        still_high = now > self.threshold("plateau.still_high") * self.first_loss
        if improvement >= self.threshold("plateau.min_improvement") or not still_high:
            return None
        return {
            "loss": loss,
            "best_loss": now,
            "first_loss": self.first_loss,
            "improvement": improvement,
            "window_rows": window,
            "message": f"plateau: the best train loss improved {improvement:.2%} over the last {window} "
            f"logged rows and is still {now / self.first_loss:.0%} of the first; raise lr, check the model "
            "and labels, or stop the run",
        }

    def _grad_spike(self, row: dict[str, Any]) -> dict[str, Any] | None:
        norm = _finite(row.get("grad_norm"))
        if norm is None:
            return None
        history = self.grad_norms
        spike = None
        if len(history) >= self.threshold("grad_spike.min_history"):
            median = statistics.median(history)
            if median > 0 and norm > self.threshold("grad_spike.factor") * median:
                spike = {
                    "grad_norm": norm,
                    "median_grad_norm": median,
                    "message": f"grad_spike: gradient norm {norm:.4g} is {norm / median:.0f}x its running "
                    f"median {median:.4g}; set max_grad_norm, lower lr, or look for bad batches",
                }
        _push(history, norm)
        return spike

    def _grad_collapse(self, row: dict[str, Any]) -> dict[str, Any] | None:
        norm = _finite(row.get("grad_norm"))
        if norm is None:
            return None
        if self.first_grad_norm is None:
            self.first_grad_norm = norm
        threshold = self.threshold("grad_collapse.threshold")
        self.low_grad_rows = self.low_grad_rows + 1 if norm <= threshold else 0
        if self.low_grad_rows < self.threshold("grad_collapse.window"):
            return None
        return {
            "grad_norm": norm,
            "first_grad_norm": self.first_grad_norm,
            "rows_low": self.low_grad_rows,
            "message": f"grad_collapse: gradient norm {norm:.3g} <= {threshold:g} for {self.low_grad_rows} "
            "logged rows; the model has stopped learning (dead activations, detached graph, frozen "
            "or zero weights?)",
        }

    def _lr_schedule(self, row: dict[str, Any]) -> dict[str, Any] | None:
        lr, scheduled = _finite(row.get("lr")), _finite(row.get("scheduled_lr"))
        if lr is None or scheduled is None:
            return None
        gap = abs(lr - scheduled) / max(abs(scheduled), 1e-30)
        self.lr_off_rows = self.lr_off_rows + 1 if gap > self.threshold("lr_schedule.tolerance") else 0
        if self.lr_off_rows < self.threshold("lr_schedule.window"):
            return None
        return {
            "lr": lr,
            "scheduled_lr": scheduled,
            "relative_gap": gap,
            "message": f"lr_schedule: lr {lr:.4g} differs from the schedule's {scheduled:.4g}; something "
            "else changes it (a callback, an extra scheduler.step(), a custom optimizer)",
        }

    def _throughput(self, row: dict[str, Any]) -> dict[str, Any] | None:
        speed = _finite(row.get("samples_per_sec"))
        if speed is None:
            return None
        history = self.speeds
        finding = None
        if len(history) >= self.threshold("throughput.min_history"):
            median = statistics.median(history)
            slow = speed < self.threshold("throughput.factor") * median
            self.slow_rows = self.slow_rows + 1 if slow else 0
            if self.slow_rows >= self.threshold("throughput.window"):
                finding = {
                    "samples_per_sec": speed,
                    "median_samples_per_sec": median,
                    "rows_slow": self.slow_rows,
                    "message": f"throughput: {speed:.4g} samples/s, {speed / median:.0%} of the running "
                    f"median {median:.4g} for {self.slow_rows} logged rows; look for a data-loading "
                    "stall (num_workers), a slow callback, or a busy machine",
                }
            if slow:
                return finding  # slow rows stay out of the median, so a long stall keeps being measured
        _push(history, speed)
        return finding

    def _memory_growth(self, row: dict[str, Any]) -> dict[str, Any] | None:
        memory = _finite(row.get("memory_mb"))
        if memory is None:
            return None
        _push(self.memory, memory)
        window = int(self.threshold("memory_growth.window"))
        if len(self.memory) <= window:
            return None
        recent = self.memory[-window - 1 :]
        growth = recent[-1] - recent[0]
        rising = sum(later > earlier for earlier, later in itertools.pairwise(recent)) / window
        if growth < self.threshold("memory_growth.min_growth_mb") or rising < self.threshold(
            "memory_growth.rising_fraction"
        ):
            return None
        return {
            "memory_mb": memory,
            "growth_mb": growth,
            "window_rows": window,
            "rising_fraction": rising,
            "message": f"memory_growth: memory grew {growth:.0f} MiB over the last {window} logged rows "
            "and keeps rising; something keeps tensors alive (a list of losses without .item() or "
            ".detach(), a cache)",
        }

    def _warmup_missing(self, row: dict[str, Any]) -> dict[str, Any] | None:
        config = self.config
        step = int(row.get("step", 0))
        # Only our own schedule is known to lack warm-up; onecycle has its own rise.
        if (
            "scheduled_lr" not in row
            or config.warmup_steps
            or config.warmup_ratio
            or config.scheduler == "onecycle"
            or config.lr < self.threshold("warmup_missing.min_lr")
            or step > self.threshold("warmup_missing.early_steps")
        ):
            return None
        loss, norm = _finite(row.get("loss")), _finite(row.get("grad_norm"))
        # Runs before the other checks: best loss and grad-norm history are those of the earlier rows.
        best = self.best_loss
        median_norm = statistics.median(self.grad_norms) if self.grad_norms else None
        loss_spike = (
            loss is not None
            and best is not None
            and loss > self.threshold("warmup_missing.loss_factor") * best
        )
        grad_spike = (
            norm is not None
            and median_norm
            and norm > self.threshold("warmup_missing.grad_factor") * median_norm
        )
        if not (loss_spike or grad_spike or (loss is None and "loss" in row)):
            return None
        return {
            "lr": config.lr,
            "loss": loss,
            "best_loss": best,
            "grad_norm": norm,
            "median_grad_norm": median_norm,
            "message": f"warmup_missing: lr {config.lr:g} without warm-up and the loss or gradient norm "
            f"spiked at step {step}; set warmup_ratio=0.05 (or warmup_steps) or lower lr",
        }

    def _overfitting(self, row: dict[str, Any]) -> dict[str, Any] | None:
        eval_loss = _finite(row.get("eval_loss"))
        if eval_loss is None:
            return None
        self.evals.append(
            {"step": int(row.get("step", 0)), "eval_loss": eval_loss, "train_loss": self.last_train_loss}
        )
        best_index = min(range(len(self.evals)), key=lambda i: self.evals[i]["eval_loss"])
        del self.evals[:best_index]  # only the minimum and what came after it matter
        best, current = self.evals[0], self.evals[-1]
        since = len(self.evals) - 1
        train_then, train_now = best["train_loss"], current["train_loss"]
        train_falling = train_then is not None and train_now is not None and train_now < train_then
        needed = int(self.threshold("overfitting.evals"))
        if since < needed:
            return None
        # Consecutive rises, not just "above the minimum": a noisy eval loss wanders around its floor.
        recent = [entry["eval_loss"] for entry in self.evals[-needed - 1 :]]
        rising = all(later > earlier for earlier, later in itertools.pairwise(recent))
        rose = current["eval_loss"] >= (1 + self.threshold("overfitting.min_rise")) * best["eval_loss"]
        if not (rising and rose and train_falling):
            return None
        return {
            "since_step": best["step"],
            "eval_loss": current["eval_loss"],
            "best_eval_loss": best["eval_loss"],
            "train_loss": train_now,
            "train_loss_at_best": train_then,
            "evals_since_best": since,
            "message": f"overfitting since step {best['step']}: eval loss {current['eval_loss']:.4g} rose "
            f"from {best['eval_loss']:.4g} over {since} evaluations while train loss fell; use "
            "load_best_at_end, early_stopping_patience, more data, weight_decay or dropout",
        }

    def _at_chance(self, row: dict[str, Any]) -> dict[str, Any] | None:
        eval_loss = _finite(row.get("eval_loss"))
        if eval_loss is None:
            return None
        step, start = int(row.get("step", 0)), self.first_step_loss
        # The first step's loss is the untrained model's: for a classifier it is about ln(num_classes), the
        # loss of a uniform prediction, and it needs no knowledge of the task. An eval loss not below it
        # after the warm-up means the model predicts no better than it did before training.
        at_chance = (
            start is not None
            and step > self.warmup_steps
            and eval_loss >= self.threshold("at_chance.fraction") * start
        )
        self.chance_evals = self.chance_evals + 1 if at_chance else 0
        if self.chance_evals < self.threshold("at_chance.evals"):
            return None
        accuracy = _finite(row.get("eval_accuracy"))
        return {
            "eval_loss": eval_loss,
            "first_step_loss": start,
            **({"eval_accuracy": accuracy} if accuracy is not None else {}),
            "evals_at_chance": self.chance_evals,
            "message": f"at_chance: eval loss {eval_loss:.4g} is not below the model's {start:.4g} before "
            f"training (the first step's loss) for {self.chance_evals} evaluations; lower lr if the train "
            "loss diverged, else check the labels and the model's output",
        }

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON data (no NaN): what the checks remember, so a resumed run reports the same findings."""
        return {
            "reported": dict(self.reported),
            "first_step_loss": self.first_step_loss,
            "first_loss": self.first_loss,
            "best_loss": self.best_loss,
            "high_rows": self.high_rows,
            "best_at_row": list(self.best_at_row),
            "grad_norms": list(self.grad_norms),
            "first_grad_norm": self.first_grad_norm,
            "low_grad_rows": self.low_grad_rows,
            "lr_off_rows": self.lr_off_rows,
            "speeds": list(self.speeds),
            "slow_rows": self.slow_rows,
            "memory": list(self.memory),
            "last_nonfinite_skips": self.last_nonfinite_skips,
            "evals": [dict(entry) for entry in self.evals],
            "chance_evals": self.chance_evals,
            "last_train_loss": self.last_train_loss,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Replace everything the checks remember (None: what a new run remembers); raises ValueError for a
        state that lacks some of it. Keys added later (``_ADDED_KEYS``) may be missing from older checkpoints:
        they take a new run's values."""
        fresh = Diagnostics(self.config, self.total_steps).state_dict()
        if state is None:
            state = fresh
        if not isinstance(state, dict):
            raise ValueError(f"diagnostics: the state must be a mapping, got {type(state).__name__}")
        missing = sorted(fresh.keys() - state.keys() - _ADDED_KEYS)
        if missing:
            raise ValueError(f"diagnostics: the state lacks {missing}")
        for key, value in fresh.items():
            setattr(self, key, state.get(key, value))
