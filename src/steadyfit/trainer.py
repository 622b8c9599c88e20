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
          unscale -> [ranks: one all_reduce of count, loss, samples and the preemption vote]
          divide grads by the window's count (sum losses, ranks) -> pre-clip norm -> clip
          guard: loss and norm finite? no -> skip, count, optimizer/scheduler/step untouched
            (fused optimizers: decided on the device, booked at the next read point, see DeviceSkip)
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
from steadyfit.diagnostics import Diagnostics, validate_diagnostics
from steadyfit.distributed import Distributed, full_tensor, local_tensor
from steadyfit.ema import WeightEMA
from steadyfit.evaluation import evaluate_model, predict
from steadyfit.guard import MAX_UNREAD_STEPS, DeviceSkip, NonFiniteGuard, UnreadStep
from steadyfit.loggers.window import WindowStats, memory_mb
from steadyfit.loss import as_sum_and_count, model_loss
from steadyfit.optim import resolve_optimizer
from steadyfit.precision import Precision
from steadyfit.rng import seed_everything, set_deterministic
from steadyfit.rundir import RunDirectory
from steadyfit.schedules import resolve_scheduler
from steadyfit.signals import PreemptionFlag
from steadyfit.state import FitResult, TrainState
from steadyfit.tracking import BestTracker, metric_key


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
        >>> import tempfile
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
        self.dist = Distributed.setup(self.config)
        self.device = self.dist.device(self.config.device)
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
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.non_blocking = self.device.type == "cuda"
        self._user_optimizer = optimizer
        self._user_scheduler = scheduler
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._train_model: Callable[..., Any] = self.model
        self.tracker = self._build_tracker()
        validate_diagnostics(self.config.stop_on, self.config.diagnostic_thresholds)
        self.run: RunDirectory | None = None
        self._params: list[torch.nn.Parameter] = []
        self._preempt_votes: torch.Tensor | None = None
        self.diagnostics: Diagnostics | None = None
        self.ema: WeightEMA | None = None
        self.device_skip: DeviceSkip | None = None
        self._read_every_step = False
        self._outcomes_read = True

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
                if self.device_skip is not None:
                    self.device_skip.release()
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
        metrics = self._evaluate_model(self.model, data)
        if getattr(self, "ema", None) is not None:
            ema_metrics = self._evaluate_model(self.ema.module, data)
            metrics.update({f"ema_{key}": value for key, value in ema_metrics.items()})
        return metrics

    def _evaluate_model(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return evaluate_model(model, data, self._forward, self.metrics, self.spec, self.precision, self.dist)

    def predict(self, data: Any) -> Any:
        """The model's outputs over ``data``, in order (tensors concatenated along the batch dimension).

        Under several ranks every rank predicts the whole of ``data``.

        Example:
            >>> logits = trainer.predict(test_ds)  # doctest: +SKIP
        """
        return predict(self.model, data, self.spec, self.precision)

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
            stepped = self._train_step(window, state.batch_in_epoch, preemption)
            state.batch_in_epoch += len(window)
            window = list(itertools.islice(micro_batches, config.grad_accum_steps))
            # Fetching the next window first tells whether this step ended the epoch, so a checkpoint
            # written at this boundary already records the next epoch at position 0.
            epoch_ended = not window
            if epoch_ended:
                state.epoch += 1
                state.batch_in_epoch = 0
            self._after_step(stepped, epoch_ended)
            if self._is_preempted(preemption):
                self.run.preempt(preemption.signum)
            if epoch_ended:
                self.callbacks.fire("on_epoch_end", self, state)
            if self._is_done():
                return

    def _train_step(self, window: list[Any], first_index: int, preemption: PreemptionFlag) -> bool:
        """One optimizer step over a window of micro-batches. Returns False when the step was skipped."""
        optimizer, precision = self.optimizer, self.precision
        batch_size = self.config.batch_size
        sample_counts = [
            self.dist.samples_in(self.train_data, batch, first_index + i, batch_size)
            for i, batch in enumerate(window)
        ]
        window_samples = sum(sample_counts)
        while True:
            try:
                loss_sum, loss_count, is_pair = self._accumulate(window, sample_counts, window_samples)
                break
            except torch.OutOfMemoryError:
                if self.config.micro_batch_size != "auto" or (self.micro_limit or 2) <= 1:
                    raise
                # Halve the forward size and redo the window: same samples, same weighting, same result.
                self.micro_limit = max(1, (self.micro_limit or max(sample_counts)) // 2)
                optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.run.progress.message(
                    f"steadyfit: out of memory; micro-batches of {self.micro_limit} now"
                )
        precision.unscale_(optimizer)
        if self.dist.is_distributed:
            # One small collective per step: the window's count and loss over all ranks (exact normalisation,
            # honest logging), with the preemption vote riding on the same reduction.
            totals = torch.stack(
                [
                    torch.as_tensor(loss_count, dtype=torch.float64, device=self.device),
                    loss_sum.to(torch.float64),
                    torch.tensor(float(preemption.is_set), dtype=torch.float64, device=self.device),
                    torch.tensor(float(window_samples), dtype=torch.float64, device=self.device),
                ]
            )
            self.dist.all_reduce_sum(totals)
            loss_count, loss_sum, self._preempt_votes = totals[0], totals[1], totals[2]
            window_samples = self._global_samples(first_index, len(window), totals[3])
            # DDP / FSDP averaged the grads over ranks; make it a sum over the global count.
            self._divide_grads(totals[0] / self.dist.world_size)
        elif is_pair:
            self._divide_grads(loss_count)
        grad_norm = self._clip_and_norm()
        checked = self.guard.checked_value(loss_sum, grad_norm)
        if self.device_skip is not None and self.state.step > 0:
            # Decided on the device; booked at the next read point. (The first step of a run is checked on
            # the host, so a run's optimizer state is never created by a skipped step.)
            if not self.device_skip.unread:
                self.device_skip.plan(self._steps_to_next_read())
            finite = self.device_skip.step(checked)
            self.device_skip.unread.append(
                UnreadStep(
                    finite,
                    loss_sum,
                    loss_count,
                    window_samples,
                    grad_norm,
                    is_pair,
                    self.state.epoch,
                    first_index,
                )
            )
            return True
        if not self.guard.is_finite(checked):
            self._skip_step(loss_sum)
            return False
        precision.step(optimizer)
        precision.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self._book_step(loss_sum, loss_count, window_samples, grad_norm, is_pair)
        return True

    def _book_step(
        self, loss_sum: torch.Tensor, loss_count: Any, samples: int, grad_norm: torch.Tensor, is_pair: bool
    ) -> None:
        """An applied optimizer step: the scheduler, the counters and the logging window move on."""
        self.guard.record_ok(self.state)
        self.scheduler.step()
        self.state.step += 1
        self.state.samples_seen += samples
        self.window_stats.add(loss_sum, loss_count, samples, grad_norm, counts_tokens=is_pair)

    def _steps_to_next_read(self) -> int:
        """Optimizer steps until the host must know the step count: the next logging, evaluation or
        checkpoint step, max_steps, or the next multiple of MAX_UNREAD_STEPS. A function of the step count
        alone, so every rank reads at the same steps."""
        config, step = self.config, self.state.step
        eval_every = config.eval_every if self.eval_data is not None else None
        intervals = (config.log_every, eval_every, config.save_every, MAX_UNREAD_STEPS)
        gaps = [every - step % every for every in intervals if every]
        if config.max_steps is not None:
            gaps.append(config.max_steps - step)
        return max(1, min(gaps))

    def _read_device_steps(self) -> bool:
        """Book the steps taken on the device since the last read point (one host read). Returns whether
        the last of them was applied (True when there was none)."""
        device_skip = self.device_skip
        if device_skip is None or not device_skip.unread:
            return True
        unread, outcomes = device_skip.read_outcomes()
        for step, applied in zip(unread, outcomes, strict=True):
            if applied:
                self._book_step(
                    step.loss_sum, step.loss_count, step.samples, step.grad_norm, step.counts_tokens
                )
            else:
                self._book_skip(position=(step.epoch, step.batch_in_epoch))
        # The bar moves here for all but the last step, which _after_step counts as usual.
        self.run.progress.step(sum(outcomes[:-1]))
        return outcomes[-1]

    def _accumulate(
        self, window: list[Any], sample_counts: list[int], window_samples: int
    ) -> tuple[Any, ...]:
        """Forward and backward every micro-batch of the window; grads end up summed over the window."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum: Any = 0.0
        loss_count: Any = 0
        is_pair = False
        pieces = list(self._micro_batches(window, sample_counts))
        distributed = self.dist.is_distributed
        for position, (micro_batch, num_samples) in enumerate(pieces):
            micro_batch = data_mod.move_to(micro_batch, self.device, self.non_blocking)
            with self.dist.gradient_sync(self._train_model, position == len(pieces) - 1):
                with self.precision.autocast():
                    _, value, _ = self._forward(self._train_model, micro_batch)
                total, count, is_pair = as_sum_and_count(value, num_samples)
                if num_samples == 0:
                    # A stand-in for this rank's empty share of a short last batch: it takes part in the
                    # gradient sync with weight zero.
                    total, count = total * 0.0, count * 0
                if is_pair or distributed:
                    # Backward the sum; grads are divided by the window's (global) count afterwards.
                    backward_loss = total
                elif num_samples == window_samples:
                    backward_loss = value  # one micro-batch: exactly the plain loop's backward
                else:
                    backward_loss = value * (num_samples / window_samples)
                self.precision.scale(backward_loss).backward()
            loss_sum = total.detach().float() + loss_sum
            loss_count = loss_count + count
        return loss_sum, loss_count, is_pair

    def _global_samples(self, first_index: int, num_batches: int, reduced: torch.Tensor) -> int:
        """Samples the step consumed on all ranks: known from the data position for map-style data, without
        a host read; otherwise read from the step's reduction (a sync, only for iterable data)."""
        if data_mod.is_map_style(self.train_data):
            global_batch = self.config.batch_size * self.dist.world_size
            start = first_index * global_batch
            return max(0, min(num_batches * global_batch, len(self.train_data) - start))
        return int(reduced)

    def _divide_grads(self, divisor: Any) -> None:
        grads = [local_tensor(p.grad) for p in self._params if p.grad is not None]
        torch._foreach_div_(grads, torch.as_tensor(divisor, device=self.device, dtype=torch.float32))

    def _is_preempted(self, preemption: PreemptionFlag) -> bool:
        if self._preempt_votes is None:
            return preemption.is_set
        if not self._outcomes_read:
            # The vote is read with the step outcomes, at the next read point: every rank reads at the same
            # steps (see _after_step), so all stop at the same boundary, and no step pays a synchronisation.
            return False
        return bool(self._preempt_votes > 0)

    def _micro_batches(self, window: list[Any], sample_counts: list[int]) -> Iterable[tuple[Any, int]]:
        limit = self.micro_limit
        for batch, num_samples in zip(window, sample_counts, strict=True):
            if limit is None or num_samples <= limit:
                yield batch, num_samples
                continue
            for piece in data_mod.split_batch(batch, limit):
                yield piece, data_mod.count_samples(piece)

    def _after_step(self, stepped: bool, epoch_ended: bool) -> None:
        state, config = self.state, self.config
        device_skip = self.device_skip
        self._outcomes_read = True
        if device_skip is not None and device_skip.unread:
            read_point = (
                epoch_ended or len(device_skip.unread) >= device_skip.horizon or self._read_every_step
            )
            if not read_point:
                self._outcomes_read = False
                return
            stepped = self._read_device_steps()
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
        self._book_skip()

    def _book_skip(self, position: tuple[int, int] | None = None) -> None:
        """A skipped step: counted and reported, or NonFiniteError (``raise``, too many in a row).

        ``position``: (epoch, batch in the epoch) of a step booked after the fact; else the current one.
        """
        state = self.state
        self.guard.record_skip(state, self.run.last_checkpoint, "loss or gradient", position=position)
        self.run.progress.message(
            f"skipped step {state.step + 1}: non-finite loss or gradient "
            f"({state.nonfinite_skips} skipped so far)"
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
        grad_norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
        if config.max_grad_norm is not None:
            # A non-finite norm would turn every gradient into NaN here; the guard skips that step anyway.
            torch.nn.utils.clip_grads_with_norm_(self._params, config.max_grad_norm, grad_norm, foreach=True)
        if config.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self._params, config.clip_value, foreach=True)
        return grad_norm

    def _log_train(self) -> None:
        row = self.window_stats.row(self.state, self.optimizer)
        row["memory_mb"], row["peak_memory_mb"] = memory_mb(self.device)
        if self._lr_factor is not None:
            row["scheduled_lr"] = self.scheduler.base_lrs[0] * self._lr_factor(self.state.step)
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
        self._read_device_steps()
        if self.window_stats.pending_steps:
            self._log_train()
        if self.eval_data is not None and state.last_eval_step != state.step:
            self._evaluate_and_track()
        self.run.finish()

    # ------------------------------------------------------------------------------------- set-up
    def _prepare_optimization(self) -> None:
        config = self.config
        if config.ema_decay and self.dist.strategy == "fsdp":
            raise ConfigError("ema_decay: not supported with strategy=fsdp (the average would need sharding)")
        # Wrap before building the optimizer: FSDP2 replaces the parameters by sharded ones in place.
        wrapped = self.dist.wrap(self.model, config.precision, tuple(config.fsdp_blocks))
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        if not self._params:
            raise ConfigError("model: it has no parameter with requires_grad=True; there is nothing to train")
        self.optimizer = resolve_optimizer(self.model, config, self._user_optimizer)
        self.total_steps = self._total_steps()
        self.scheduler = resolve_scheduler(self.optimizer, config, self.total_steps, self._user_scheduler)
        self._train_model = torch.compile(wrapped) if config.compile else wrapped
        self.ema = WeightEMA(self.model, config.ema_decay) if config.ema_decay else None
        # EMA and fp16's GradScaler read the host every step anyway; they keep the host-side check.
        device_checks = self.ema is None and not self.precision.uses_scaler
        self.device_skip = None
        if device_checks and DeviceSkip.applies(self.optimizer, self.scheduler, policy=config.on_nonfinite):
            self.device_skip = DeviceSkip(self.optimizer, self.scheduler, self.device)
        # A callback on every step sees each step's exact state, so every step is a read point; under
        # several ranks every rank must read at the same steps (the preemption vote rides on the reads).
        self._read_every_step = self._any_rank(self.callbacks.has("on_step_end"))
        if config.diagnostics and self.dist.is_main:
            self.diagnostics = Diagnostics(config, self.total_steps)
        # Our schedule's own factor (the LambdaLR's), so logged rows can say what the lr should be.
        self._lr_factor = self.scheduler.lr_lambdas[0] if self._user_scheduler is None else None
        self.micro_limit = config.micro_batch_size if isinstance(config.micro_batch_size, int) else None
        self.window_stats = WindowStats(self.device)
        self.last_metrics: dict[str, float] = {}

    def _any_rank(self, flag: bool) -> bool:
        if not self.dist.is_distributed:
            return flag
        votes = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce_sum(votes)
        return bool(votes > 0)  # once, at set-up

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
