"""The Trainer: fit(), evaluate() and predict(). THE loop, readable top to bottom.

One optimizer step, as fit() runs it::

    fit()
      on_fit_start                             (after resume restored model, optimizer, RNG, data position)
      for epoch:
        on_epoch_start
        for window of grad_accum_steps micro-batches:     # fetched first: sample counts known up front
          zero_grad(set_to_none)
          for micro_batch in window:                      # DDP: no_sync on all but the last
            forward + loss under autocast -> (sum, count)
            backward(scale(mean * n_i / n_window))         # or backward(sum) for (sum, count) losses
          unscale -> divide grads by the window's count (sum losses) -> norm (+ clip)
          guard: loss and norm finite? no -> skip, count, optimizer/scheduler/step untouched
          optimizer.step -> scaler.update -> scheduler.step -> step += 1
          log (host reads happen here only) -> on_step_end
          evaluate (every eval_every / epoch end) -> on_evaluate -> best tracking, early stopping
          CHECKPOINT may be written here: save_every, new best, preemption (then exit 143/130)
          stop? (max_steps, early stopping, stop request, preemption)
        on_epoch_end
      final evaluate, final checkpoint, final/model.safetensors, load_best_at_end
      on_fit_end                                    (on_exception instead when anything raised)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from steadyfit import data as data_mod
from steadyfit.callbacks import Callback, CallbackList
from steadyfit.config import ConfigError, TrainConfig, make_config
from steadyfit.guard import NonFiniteGuard
from steadyfit.loss import as_sum_and_count, model_loss
from steadyfit.metrics import MetricAccumulator
from steadyfit.optim import resolve_optimizer
from steadyfit.precision import Precision
from steadyfit.rng import seed_everything, set_deterministic
from steadyfit.rundir import RunDirectory
from steadyfit.schedules import resolve_scheduler
from steadyfit.signals import PreemptionFlag
from steadyfit.state import FitResult, TrainState
from steadyfit.tracking import BestTracker, metric_key


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: 'cuda' was asked for but no CUDA device is available; use device=cpu or auto"
        )
    return torch.device(name)


class Trainer:
    """Trains a model with the guarantees of steadyfit's DESIGN.md.

    Args:
        model: the ``torch.nn.Module`` to train (moved to the configured device).
        config: a :class:`TrainConfig` (or a dict of its fields).
        train_data: map-style Dataset, IterableDataset (needs ``max_steps``) or DataLoader.
        eval_data: same kinds; evaluated in order.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean or ``(sum, count)``; None for models
            that return ``outputs.loss`` (dict batches).
        metrics: name -> function with the loss contract, or torchmetrics ``Metric``.
        callbacks: :class:`Callback` instances.
        optimizer: None (built from config), an Optimizer, or ``factory(model) -> Optimizer``.
        scheduler: None (built from config), an LR scheduler, or ``factory(optimizer) -> scheduler``.
        collate_fn: passed to the DataLoaders we build.

    Example:
        >>> from steadyfit import Trainer, TrainConfig
        >>> model = torch.nn.Linear(4, 2)
        >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> config = TrainConfig(run_dir=tempfile.mkdtemp(), max_epochs=1, batch_size=8, progress=False)
        >>> result = Trainer(model, config, train_data=data, loss_fn=torch.nn.functional.cross_entropy).fit()
        >>> result.global_step
        4
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig | dict[str, Any] | None = None,
        *,
        train_data: Any = None,
        eval_data: Any = None,
        loss_fn: Callable[..., Any] | None = None,
        metrics: dict[str, Callable[..., Any]] | None = None,
        callbacks: Iterable[Callback] = (),
        optimizer: Any = None,
        scheduler: Any = None,
        collate_fn: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config if isinstance(config, TrainConfig) else make_config(dict(config or {}))
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.eval_data = eval_data
        self.loss_fn = loss_fn
        self.metrics = dict(metrics or {})
        self.callbacks = CallbackList(callbacks)
        self.state = TrainState()
        self.precision = Precision(self.config.precision, self.device)
        self.guard = NonFiniteGuard(self.config.on_nonfinite, self.config.max_consecutive_skips)
        self.spec = data_mod.LoaderSpec(
            batch_size=self.config.batch_size,
            eval_batch_size=self.config.resolved_eval_batch_size,
            num_workers=self.config.num_workers,
            seed=self.config.seed,
            pin_memory=self.device.type == "cuda",
            collate_fn=collate_fn,
        )
        self.non_blocking = self.device.type == "cuda"
        self._user_optimizer = optimizer
        self._user_scheduler = scheduler
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._train_model: Callable[..., Any] = self.model
        self.tracker = self._build_tracker()
        self.run: RunDirectory | None = None
        self._params: list[torch.nn.Parameter] = []

    # ----------------------------------------------------------------------------------------- public
    def fit(self) -> FitResult:
        """Train until ``max_steps`` or ``max_epochs``, whichever comes first; resume if the run directory
        holds a checkpoint (``resume=auto``).

        Returns:
            FitResult with global_step, epoch, train_loss, metrics, best_metric, best_checkpoint.

        Raises:
            ConfigError: for a config that cannot work with this data.
            NonFiniteError: under ``on_nonfinite=raise`` or after too many consecutive skips.
            Preempted: after SIGTERM/SIGINT, once the checkpoint is written (exits 143/130).
        """
        if self.train_data is None:
            raise ConfigError("train_data: fit() needs training data; pass train_data=... to the Trainer")
        config = self.config
        seed_everything(config.seed)
        set_deterministic(config.deterministic)
        self._prepare_optimization()
        self.run = RunDirectory(self, total_steps=self.total_steps)
        with self.run, PreemptionFlag() as preemption:
            try:
                self.run.resume_or_start()
                self.model.train()
                self.callbacks.fire("on_fit_start", self, self.state)
                while not self._is_done():
                    self._train_epoch(preemption)
                self._finish()
                self.callbacks.fire("on_fit_end", self, self.state)
            except BaseException as exc:
                self.callbacks.fire("on_exception", self, self.state, exc)
                raise
        return self._result()

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Exact per-sample (per-token for ``(sum, count)`` losses) averages over the whole eval set.

        Returns:
            ``{"eval_loss": ..., "eval_<metric>": ...}``.

        Example:
            >>> scores = trainer.evaluate()  # doctest: +SKIP
        """
        data = self.eval_data if data is None else data
        if data is None:
            raise ConfigError("eval_data: evaluate() needs data; pass eval_data=... to the Trainer")
        accumulator = MetricAccumulator(self.metrics, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in data_mod.eval_batches(data, self.spec):
                    batch = data_mod.move_to(batch, self.device, self.non_blocking)
                    num_samples = data_mod.count_samples(batch)
                    with self.precision.autocast():
                        outputs, value, targets = self._forward(self.model, batch)
                    total, count, _ = as_sum_and_count(value, num_samples)
                    accumulator.add_loss(total, count)
                    accumulator.add_batch(outputs, targets, num_samples)
        finally:
            self.model.train(was_training)
        # One host read (and, under several ranks, one collective) for the whole evaluation.
        return accumulator.compute()

    def predict(self, data: Any) -> Any:
        """The model's outputs over ``data``, in order (tensors concatenated along the batch dimension).

        Example:
            >>> logits = trainer.predict(test_ds)  # doctest: +SKIP
        """
        outputs: list[Any] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in data_mod.eval_batches(data, self.spec):
                    batch = data_mod.move_to(batch, self.device, self.non_blocking)
                    inputs = (
                        batch
                        if isinstance(batch, dict)
                        else batch[0]
                        if isinstance(batch, (tuple, list))
                        else batch
                    )
                    with self.precision.autocast():
                        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
                    outputs.append(out)
        finally:
            self.model.train(was_training)
        if outputs and all(isinstance(out, torch.Tensor) for out in outputs):
            return torch.cat(outputs)
        return outputs

    def request_stop(self, reason: str = "stop requested by a callback") -> None:
        """Stop at the next step boundary (after that step's evaluation and checkpoint)."""
        self.state.should_stop = True
        self.state.stop_reason = reason

    # ------------------------------------------------------------------------------------- the loop
    def _train_epoch(self, preemption: PreemptionFlag) -> None:
        state, config = self.state, self.config
        self.callbacks.fire("on_epoch_start", self, state)
        micro_batches = iter(
            data_mod.train_batches(self.train_data, self.spec, state.epoch, state.batch_in_epoch)
        )
        # A window is fetched whole before its first forward: its sample count weights mean losses exactly
        # (the last window of an epoch may be short).
        window = list(itertools.islice(micro_batches, config.grad_accum_steps))
        while window:
            stepped = self._train_step(window)
            state.batch_in_epoch += len(window)
            window = list(itertools.islice(micro_batches, config.grad_accum_steps))
            # Fetching the next window first tells whether this step ended the epoch, so a checkpoint
            # written at this boundary already records the next epoch at position 0.
            epoch_ended = not window
            if epoch_ended:
                state.epoch += 1
                state.batch_in_epoch = 0
            self._after_step(stepped, epoch_ended)
            if preemption.is_set:
                self.run.preempt(preemption.signum)
            if epoch_ended:
                self.callbacks.fire("on_epoch_end", self, state)
            if self._is_done():
                return

    def _train_step(self, window: list[Any]) -> bool:
        """One optimizer step over a window of micro-batches. Returns False when the step was skipped."""
        optimizer, precision = self.optimizer, self.precision
        sample_counts = [data_mod.count_samples(batch) for batch in window]
        window_samples = sum(sample_counts)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        loss_count: Any = 0
        sums_need_normalising = False
        for micro_batch, num_samples in zip(window, sample_counts, strict=True):
            micro_batch = data_mod.move_to(micro_batch, self.device, self.non_blocking)
            with precision.autocast():
                _, value, _ = self._forward(self._train_model, micro_batch)
            total, count, is_pair = as_sum_and_count(value, num_samples)
            if is_pair:
                # (sum, count): backward the sum; the grads are divided by the window's count afterwards.
                backward_loss, sums_need_normalising = total, True
            elif num_samples == window_samples:
                backward_loss = value  # one micro-batch: exactly the plain loop's backward
            else:
                backward_loss = value * (num_samples / window_samples)
            precision.scale(backward_loss).backward()
            loss_sum = loss_sum + total.detach().float()
            loss_count = loss_count + count
        precision.unscale_(optimizer)
        if sums_need_normalising:
            grads = [p.grad for p in self._params if p.grad is not None]
            torch._foreach_div_(grads, torch.as_tensor(loss_count, device=self.device, dtype=torch.float32))
        grad_norm = self._clip_and_norm()
        if not self.guard.is_finite(loss_sum, grad_norm):
            self._skip_step(loss_sum)
            return False
        self.guard.record_ok(self.state)
        precision.step(optimizer)
        precision.update()
        self.scheduler.step()
        self.state.step += 1
        self.state.samples_seen += window_samples
        self.window_stats.add(loss_sum, loss_count, window_samples, grad_norm)
        return True

    def _after_step(self, stepped: bool, epoch_ended: bool) -> None:
        state, config = self.state, self.config
        if stepped:
            if config.log_every and state.step % config.log_every == 0:
                self._log_train()
            self.run.progress.step()
            self.callbacks.fire("on_step_end", self, state)
        if self.eval_data is not None and state.last_eval_step != state.step:
            periodic = bool(config.eval_every) and stepped and state.step % config.eval_every == 0
            if periodic or (config.eval_every is None and epoch_ended):
                self._evaluate_and_track()
        if stepped:
            self.run.save_if_due()

    def _skip_step(self, loss_sum: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.uses_scaler:
            self.precision.update()  # records the overflow: the scale goes down
            if bool(torch.isfinite(loss_sum)):
                # fp16 overflow with a finite loss is the scaler's normal skip, not a fault.
                self.state.scaler_skips += 1
                return
        self.guard.record_skip(self.state, self.run.last_checkpoint, "loss or gradient")
        self.run.progress.message(
            f"skipped step {self.state.step + 1}: non-finite loss or gradient "
            f"({self.state.nonfinite_skips} skipped so far)"
        )

    # ------------------------------------------------------------------------------------- pieces
    def _forward(self, model: Callable[..., Any], batch: Any) -> tuple[Any, Any, Any]:
        """Run the model on a batch; returns (outputs, loss value, targets)."""
        if isinstance(batch, dict):
            outputs = model(**batch)
            targets = batch.get("labels")
            if self.loss_fn is None:
                return outputs, model_loss(outputs), targets
            return outputs, self.loss_fn(outputs, targets if targets is not None else batch), targets
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "train_data: each batch must be an (inputs, targets) pair or a dict of model arguments, "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, targets = batch
        if self.loss_fn is None:
            raise ConfigError("loss_fn: (inputs, targets) batches need a loss_fn, e.g. F.cross_entropy")
        outputs = model(inputs)
        return outputs, self.loss_fn(outputs, targets), targets

    def _clip_and_norm(self) -> torch.Tensor:
        """The pre-clip global gradient norm (logged and checked by the guard), after clipping if asked."""
        config = self.config
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if config.max_grad_norm is not None:
            # A non-finite norm would turn every gradient into NaN here; the guard skips that step anyway.
            torch.nn.utils.clip_grads_with_norm_(self._params, config.max_grad_norm, grad_norm, foreach=True)
        if config.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self._params, config.clip_value, foreach=True)
        return grad_norm

    def _log_train(self) -> None:
        row = self.window_stats.row(self.state, self.optimizer)
        if self.precision.uses_scaler:
            row["loss_scale"] = self.precision.loss_scale()
        self.run.log(row)

    def _evaluate_and_track(self) -> None:
        state = self.state
        started = time.perf_counter()
        metrics = self.evaluate()
        # Evaluation time is not training time: keep it out of samples_per_sec.
        self.window_stats.started += time.perf_counter() - started
        state.last_eval_step = state.step
        self.last_metrics = metrics
        self.run.log({"kind": "eval", "step": state.step, "epoch": state.epoch, **metrics})
        self.callbacks.fire("on_evaluate", self, state, metrics)
        if self.tracker is not None and self.tracker.update(state, metrics):
            self.run.save_best()

    def _finish(self) -> None:
        state = self.state
        if self.window_stats.pending_steps:
            self._log_train()
        if self.eval_data is not None and state.last_eval_step != state.step:
            self._evaluate_and_track()
        self.run.finish()

    # ------------------------------------------------------------------------------------- set-up
    def _prepare_optimization(self) -> None:
        config = self.config
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ConfigError("model: it has no parameter with requires_grad=True; there is nothing to train")
        self.optimizer = resolve_optimizer(self.model, config, self._user_optimizer)
        self.total_steps = self._total_steps()
        self.scheduler = resolve_scheduler(self.optimizer, config, self.total_steps, self._user_scheduler)
        self._train_model = torch.compile(self.model) if config.compile else self.model
        self.window_stats = WindowStats(self.device)
        self.last_metrics: dict[str, float] = {}

    def _total_steps(self) -> int | None:
        config = self.config
        batches = data_mod.batches_per_epoch(self.train_data, config.batch_size)
        if batches is None:
            if config.max_steps is None:
                raise ConfigError(
                    "max_steps: train_data has no length (an IterableDataset?); "
                    "set max_steps to say when to stop"
                )
            return config.max_steps
        if batches == 0:
            raise ConfigError("train_data: the training set is empty")
        steps_per_epoch = math.ceil(batches / config.grad_accum_steps)
        by_epochs = steps_per_epoch * config.max_epochs if config.max_epochs is not None else None
        candidates = [n for n in (by_epochs, config.max_steps) if n is not None]
        return min(candidates)

    def _build_tracker(self) -> BestTracker | None:
        config = self.config
        if self.eval_data is None:
            if config.load_best_at_end or config.early_stopping_patience or config.metric_for_best:
                raise ConfigError(
                    "eval_data: metric_for_best, load_best_at_end and early_stopping_patience need eval_data"
                )
            return None
        metric = config.metric_for_best or "eval_loss"
        known = {"eval_loss", *(metric_key(name) for name in self.metrics)}
        if metric_key(metric) not in known:
            raise ConfigError(f"metric_for_best: {metric!r} is not an eval metric; allowed: {sorted(known)}")
        return BestTracker(
            metric, config.greater_is_better, config.early_stopping_patience, config.early_stopping_threshold
        )

    def _is_done(self) -> bool:
        state, config = self.state, self.config
        if state.should_stop:
            return True
        if config.max_steps is not None and state.step >= config.max_steps:
            return True
        return config.max_epochs is not None and state.epoch >= config.max_epochs

    def _result(self) -> FitResult:
        state = self.state
        return FitResult(
            global_step=state.step,
            epoch=state.epoch,
            train_loss=self.window_stats.run_mean(state),
            metrics=dict(self.last_metrics),
            best_metric=state.best_metric,
            best_checkpoint=state.best_checkpoint,
            best_step=state.best_step,
            nonfinite_skips=state.nonfinite_skips,
            stop_reason=state.stop_reason,
            run_dir=str(Path(self.config.run_dir)),
        )


class WindowStats:
    """Loss and throughput over the current logging window, kept as device tensors between log steps.

    ``.item()``-style reads happen only in :meth:`row`, i.e. on logging steps.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.run_loss_sum = 0.0
        self.run_loss_count = 0.0
        self.samples = 0
        self.pending_steps = 0
        self.grad_norm: torch.Tensor | None = None
        self.started = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, count: Any, samples: int, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss_sum
        self.loss_count += count
        self.samples += samples
        self.pending_steps += 1
        self.grad_norm = grad_norm

    def row(self, state: TrainState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        now = time.perf_counter()
        elapsed = max(now - self.started, 1e-9)
        # One host read for the window's loss, count and last grad norm: this is the logging step.
        values = torch.stack([self.loss_sum, self.loss_count, self.grad_norm.to(torch.float64)]).tolist()
        loss_sum, loss_count, grad_norm = values
        self.run_loss_sum += loss_sum
        self.run_loss_count += loss_count
        row = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss_sum / loss_count if loss_count else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "samples_per_sec": self.samples / elapsed,
            "step_time_s": elapsed / max(self.pending_steps, 1),
            "samples_seen": state.samples_seen,
            "nonfinite_skips": state.nonfinite_skips,
        }
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.samples = 0
        self.pending_steps = 0
        self.started = now
        return row

    def state_dict(self) -> dict[str, float]:
        """The open logging window and run totals, so a resumed run logs the same numbers.

        Reads the host: called at save time only.
        """
        return {
            "loss_sum": float(self.loss_sum),
            "loss_count": float(self.loss_count),
            "run_loss_sum": self.run_loss_sum,
            "run_loss_count": self.run_loss_count,
            "samples": self.samples,
            "pending_steps": self.pending_steps,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        if not state:
            return
        self.loss_sum.fill_(state["loss_sum"])
        self.loss_count.fill_(state["loss_count"])
        self.run_loss_sum = state["run_loss_sum"]
        self.run_loss_count = state["run_loss_count"]
        self.samples = int(state["samples"])
        self.pending_steps = int(state["pending_steps"])

    def run_mean(self, state: TrainState) -> float | None:
        total = self.run_loss_sum + float(self.loss_sum)
        count = self.run_loss_count + float(self.loss_count)
        return total / count if count else None
