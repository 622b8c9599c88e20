"""The Trainer: fit(), evaluate() and predict(). THE loop, readable top to bottom.

One run, as fit() runs it::

    fit()
      restore every component from the newest checkpoint that restores (or start fresh)
      on_fit_start
      start row: the start-up summary (two console lines, metrics.jsonl, loggers, on_log)
      [eval_on_start: evaluate -> on_evaluate, not a candidate for the best]
      for epoch:
        on_epoch_start
        for window of grad_accum_steps micro-batches:       # fetched whole: sample counts known up front
          _train_step:
            forward + backward of each micro-batch          # weighted by its share of the window
            unscale -> [ranks: one all_reduce of count, loss, samples and the preemption vote]
            divide grads by the window's count -> pre-clip norm -> clip
            finite? host check: no -> skip (nothing touched) | device check: found_inf, decided on the device
            optimizer.step                                  # THE optimizer step, here and nowhere else
          _at_boundary:                                     # between two steps; returns at once unless
                                                            # this is a read point (below)
            settle: book every step taken since the last read point (scheduler, step, window, skips)
            log -> on_step_end -> evaluate -> on_evaluate -> best, early stopping -> [on_epoch_end]
            CHECKPOINT may be written here: save_every, preemption (then exit 143/130); a new best is held
            stop? (max_steps, max_epochs, early stopping, stop request)
      final log, evaluation, checkpoint; best weights (load_best_at_end); final/model.safetensors
      on_fit_end                                            (on_exception instead when anything raised)

Read points: every boundary when steps are checked on the host. With the device-side check (fused
Adam/AdamW) a step's outcome stays on the device until the next logging, evaluation, checkpoint, epoch end,
max_steps, every step when a callback has ``on_step_end``, and (one process) a preemption: whatever the run
does at a boundary, its state describes that boundary, since nothing observes it between read points.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from steadyfit import console
from steadyfit import data as data_mod
from steadyfit.accumulation import WindowBackward
from steadyfit.callbacks import Callback, CallbackList
from steadyfit.checkpoint.manager import CheckpointManager, Stateful
from steadyfit.checkpoint.staging import memory_of
from steadyfit.components import (
    CallbackState,
    ModelWeights,
    OptimizerState,
    RankDataStreams,
    RankRNG,
    ShardedWeights,
    upgrade_legacy_states,
)
from steadyfit.config import ConfigError, TrainConfig, make_config
from steadyfit.diagnostics import Diagnostics, validate_diagnostics
from steadyfit.distributed import Distributed
from steadyfit.ema import WeightEMA
from steadyfit.evaluation import (
    check_eval_settings,
    check_metrics_meet_every_rank,
    evaluate_model,
    predict,
)
from steadyfit.foreign_names import MIGRATING_DOC, foreign_argument_hint
from steadyfit.guard import DeviceSkip, NonFiniteGuard, ReadCadence, StepRecord
from steadyfit.horizons import Horizons, compute_horizons, fast_dev_run_settings, limit_batches
from steadyfit.identity import RunIdentity
from steadyfit.layout import CONFIG_FILE, step_of
from steadyfit.log_window import LogWindow, memory_mb
from steadyfit.loggers.progress import Progress
from steadyfit.loss import ModelLoss
from steadyfit.metrics import is_torchmetric
from steadyfit.optim import resolve_optimizer
from steadyfit.precision import SMALLEST_LOSS_SCALE, Precision
from steadyfit.recompute import enable_gradient_checkpointing
from steadyfit.rng import deterministic_algorithms, seed_everything
from steadyfit.rundir import RunDirectory
from steadyfit.schedules import reapply_schedule, resolve_scheduler
from steadyfit.secrets import redact, secret_env_values
from steadyfit.signals import Preempted, PreemptionFlag, preemption_vote, voted_signal
from steadyfit.startup import format_start, start_row
from steadyfit.state import FitResult, TrainState
from steadyfit.tracking import build_tracker


class Trainer:
    """Trains a model with the guarantees of steadyfit's DESIGN.md.

    Args:
        model: the ``torch.nn.Module`` to train (moved to the configured device).
        config: a :class:`TrainConfig` (or a dict of its fields).
        train_data: map-style Dataset, IterableDataset (needs ``max_steps``) or DataLoader.
        eval_data: same kinds; evaluated in order.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar mean or ``(sum, count)``; None for models
            that return ``outputs.loss`` (dict batches), normalised over the window's tokens where the model
            averaged over tokens (:class:`~steadyfit.loss.ModelLoss`, docs/huggingface.md).
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
        callbacks: Iterable[Callback] | Callback = (),
        optimizer: Any = None,
        scheduler: Any = None,
        collate_fn: Callable[..., Any] | None = None,
        **foreign: Any,
    ) -> None:
        if foreign:  # the Hugging Face Trainer's or Lightning's names: answered with ours
            raise ConfigError("; ".join(foreign_argument_hint(name) for name in foreign))
        config = _as_train_config(config)
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigError(
                f"loss_fn: expected a function loss_fn(outputs, targets) (torch.nn.functional.cross_entropy, "
                f"say) or None for the model's own loss, got {type(loss_fn).__name__} {loss_fn!r}"
            )
        _check_metrics(metrics)
        check_eval_settings(config, eval_data)
        if eval_data is not None:
            data_mod.check_every_sample_read(eval_data, "eval_data")
        # A DataLoader of the user's decides its batch size and workers: config.yaml records what happens.
        recorded = data_mod.loader_settings(
            config.model_fields_set, config.model_dump(), train_data, eval_data
        )
        recorded.update(fast_dev_run_settings(config))  # recorded too: config.yaml says what ran
        # A model the user compiled (torch.compile(model)) trains compiled, as with compile=true; everything
        # else (checkpoints, final/, the fingerprint, evaluation) sees the module inside, so the weights'
        # names carry no "_orig_mod." prefix and load into the plain model.
        self._user_compiled: torch.nn.Module | None = None
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            self._user_compiled, model = model, inner
            recorded["compile"] = True
        self.config = config.model_copy(update=recorded) if recorded else config
        data_mod.check_overfit_loader(self.config, train_data)
        data_mod.check_persistent_workers(self.config, eval_data)
        self.dist = Distributed.setup(self.config)
        self.device = self.dist.device(self.config.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.eval_data = eval_data
        # Without loss_fn, the model's own loss: what it averages over is read here, before any wrapping.
        warn = console.warn if self.dist.is_main else None
        kept_streams = data_mod.kept_worker_streams(train_data)
        if warn and kept_streams:
            warn(kept_streams)
        self.loss_fn = loss_fn if loss_fn is not None else ModelLoss.of(self.model, warn)
        self.metrics = dict(metrics or {})
        if eval_data is not None:
            check_metrics_meet_every_rank(self.metrics, eval_data, self.dist.world_size, "eval_data")
        # One callback alone, as Lightning takes it, or any iterable of them.
        self.callbacks = CallbackList([callbacks] if isinstance(callbacks, Callback) else callbacks)
        self.state = TrainState()
        self.precision = Precision(self.config.precision, self.device)
        self.guard = NonFiniteGuard(self.config.on_nonfinite, self.config.max_consecutive_skips)
        self.spec = data_mod.LoaderSpec.of(
            self.config, self.device, collate_fn, self.dist.rank, self.dist.world_size
        )
        # Lightning's meaning: overfit_batches also limits evaluation to that many batches.
        self._eval_batch_limit = self.config.limit_eval_batches or self.config.overfit_batches or None
        self._scratch_dir: Path | None = None
        self._eval_batches: data_mod.EvalBatches | None = None
        self._user_optimizer = optimizer
        self._user_scheduler = scheduler
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.tracker = build_tracker(self.config, self.metrics, eval_data is not None)
        validate_diagnostics(self.config.stop_on, self.config.diagnostic_thresholds)
        self.ema: WeightEMA | None = None
        self.diagnostics: Diagnostics | None = None
        self.device_skip: DeviceSkip | None = None
        self.horizons: Horizons | None = None
        self.last_metrics: dict[str, float] = {}
        self.run_directory: RunDirectory | None = None
        self.checkpoints: CheckpointManager | None = None
        self.progress = Progress(False, None)
        self._unbooked: list[StepRecord] = []
        self._preempt_votes: torch.Tensor | None = None
        # What the last checkpoint holds: the TrainState and the rows logged. The same on every rank
        # (diagnostic rows, rank 0's alone, do not count), so every rank decides alike to save again.
        self._saved_at: tuple[str, int] | None = None
        self._rows_logged = 0
        self._trained_before = False

    # ----------------------------------------------------------------------------------------- public
    def fit(self) -> FitResult:
        """Train until ``max_steps`` or ``max_epochs``, whichever comes first; resume if the run directory
        holds a checkpoint (``resume=auto``).

        Returns:
            FitResult with global_step, epoch, train_loss, metrics, best_metric, best_checkpoint.

        Raises:
            ConfigError: for a config that cannot work with this data, or a checkpoint of another run.
            NonFiniteError: under ``on_nonfinite=raise`` or after too many consecutive skips.
            Preempted: after SIGTERM/SIGINT, once the checkpoint is written (exits 143/130).
        """
        if self.train_data is None:
            raise ConfigError("train_data: fit() needs training data; pass train_data=... to the Trainer")
        config = self.config
        # An earlier fit() of this Trainer that raised left its loop behind: steps taken on the device but
        # never booked, and weights trained past step 0. This fit books none of them; it continues from a
        # checkpoint, or refuses to start over from those weights (see _resume).
        self._trained_before = self.state.step > 0 or bool(self._unbooked)
        self._unbooked, self._preempt_votes, self._saved_at = [], None, None
        seed_everything(config.seed)
        self._prepare()
        self._train_batches = data_mod.TrainBatches(self.train_data, self.spec)
        if self.eval_data is not None:
            self._eval_max_batches(self.eval_data)  # a limit that cannot apply fails now, not steps later
        run_dir = self._fast_dev_run_dir() if config.fast_dev_run else config.run_dir
        config_data = redact(config.to_yaml_dict(), secret_env_values())
        self._config_yaml = yaml.safe_dump(config_data, sort_keys=False).encode()
        self.run_directory = RunDirectory(run_dir, self.dist, self._config_yaml, config_data, config.loggers)
        self.checkpoints = CheckpointManager(run_dir, self.dist, keep_last=config.keep_last)
        self.callbacks.before_handlers = self.checkpoints.wait_staged
        self._checkpointed = self._components()
        with (
            deterministic_algorithms(config.deterministic),
            self._scratch_removed(),
            self.run_directory,
            PreemptionFlag() as preemption,
        ):
            try:
                # Inside the try: whatever ends the fit stops its eval workers (_close_loaders).
                self._eval_batches = data_mod.EvalBatches(
                    self.eval_data, self.spec, persistent=config.persistent_workers
                )
                resumed_from = self._resume()
                self.model.train()
                self.callbacks.fire("on_fit_start", self, self.state)
                self._log_start(resumed_from)
                if config.eval_on_start and self.state.step == 0 and self.state.last_eval_step is None:
                    self._evaluate_and_track(track=False)
                self._agree_on_stop()  # on_log saw the start row (and eval_on_start's) on rank 0 alone
                self.log_window.start()  # time_s and the first throughput leave set-up and loggers out
                while not self._is_done():
                    self._train_epoch(preemption)
                self._train_batches.close()
                self._finish()
                self._close_loaders()
                self.callbacks.fire("on_fit_end", self, self.state)
            except BaseException as exc:
                self._close_loaders()
                if self.device_skip is not None:
                    self.device_skip.release()  # float lrs back, found_inf gone: the optimizer is reusable
                self.progress.close()
                # The save in flight finishes and a held best is committed (not for a second Ctrl-C, which
                # means now); this error is the news.
                self.checkpoints.close(quietly=True, commit_held_best=not isinstance(exc, KeyboardInterrupt))
                self.callbacks.fire("on_exception", self, self.state, exc)
                self._leave_wrapper()
                raise
            self.progress.close()
            self.checkpoints.close()
        self._leave_wrapper()
        return self._result()

    def evaluate(self, data: Any = None) -> dict[str, float]:
        """Exact per-sample (per-token for ``(sum, count)`` losses) averages over the whole eval set (over
        its first batches with ``limit_eval_batches`` or ``overfit_batches``, as Lightning's ``validate``).

        Returns:
            ``{"eval_loss": ..., "eval_<metric>": ...}``.

        Example:
            >>> scores = trainer.evaluate()  # doctest: +SKIP
        """
        if data is not None:
            data_mod.check_every_sample_read(data, "evaluate(data)")
            check_metrics_meet_every_rank(self.metrics, data, self.dist.world_size, "evaluate(data)")
        data = self.eval_data if data is None else data
        if data is None:
            raise ConfigError("eval_data: evaluate() needs data; pass eval_data=... to the Trainer")
        models = {"": self.model, **({"ema_": self.ema.module} if self.ema is not None else {})}
        max_batches = self._eval_max_batches(data)
        scores = {}
        for prefix, model in models.items():
            found = evaluate_model(
                model,
                data,
                self.loss_fn,
                self.metrics,
                self.spec,
                self.precision,
                self.dist,
                max_batches=max_batches,
                loader=self._eval_batches,
            )
            scores.update({prefix + key: value for key, value in found.items()})
        return scores

    def _eval_max_batches(self, data: Any) -> int | None:
        """``limit_eval_batches`` (or ``overfit_batches``) as a number of batches of ``data``."""
        batches = data_mod.batches_per_epoch(data, self.spec.eval_batch_size, self.dist.world_size)
        if self.config.limit_eval_batches or not self.config.overfit_batches:
            return limit_batches(self._eval_batch_limit, batches, "limit_eval_batches")
        return limit_batches(
            self._eval_batch_limit,
            batches,
            "overfit_batches",
            "eval batches",
            " (overfit_batches limits evaluation too, as in Lightning; limit_eval_batches sets it apart)",
        )

    def predict(self, data: Any) -> Any:
        """The model's outputs over ``data``, in order, as one output: a tensor, or a ``ModelOutput`` (or
        dict) of the model's class whose tensor fields have one row per sample. Values that are not per
        sample (a batch's 0-dim mean ``loss``, a generation cache) are left out.

        Under several ranks every rank predicts the whole of ``data``.

        Raises:
            ValueError: per-sample tensors of different lengths in different batches (ragged padding).

        Example:
            >>> logits = trainer.predict(test_ds)  # doctest: +SKIP
            >>> outputs = hf_trainer.predict(test_ds)  # doctest: +SKIP
            >>> outputs.logits.shape[0] == len(test_ds)  # doctest: +SKIP
        """
        data_mod.check_every_sample_read(data, "predict(data)")
        return predict(self.model, data, self.spec, self.precision)

    def request_stop(self, reason: str = "stop requested by a callback") -> None:
        """Stop at the next step boundary (after that step's evaluation and checkpoint)."""
        self.state.should_stop = True
        self.state.stop_reason = reason

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps the run plans (see :class:`~steadyfit.horizons.Horizons`); None before fit()."""
        return self.horizons.total_steps if self.horizons is not None else None

    # ------------------------------------------------------------------------------------- the loop
    def _train_epoch(self, preemption: PreemptionFlag) -> None:
        state, accumulation = self.state, self.config.grad_accum_steps
        self.callbacks.fire("on_epoch_start", self, state)
        micro_batches = iter(self._train_batches.epoch(state.epoch, state.batch_in_epoch))
        if self.horizons.batches_per_epoch is not None:
            # limit_train_batches / overfit_batches end the epoch early; a window never crosses the limit.
            remaining = self.horizons.batches_per_epoch - state.batch_in_epoch
            micro_batches = itertools.islice(micro_batches, remaining)
        # Whole windows: their sample counts weight mean losses exactly (the last one may be short). The
        # next window is fetched only after this boundary, so a checkpoint holds the RNG streams (and data
        # position) of the boundary itself, never draws made for a window it does not contain.
        fetched = False
        while window := data_mod.fetch_window(
            micro_batches, accumulation, state.epoch, state.batch_in_epoch, self.train_data
        ):
            fetched = True
            self._train_step(window, state.batch_in_epoch, preemption)
            state.batch_in_epoch += len(window)
            epoch_ended = self.horizons.ends_epoch(state.batch_in_epoch)
            if epoch_ended:
                state.epoch += 1
                state.batch_in_epoch = 0
            self._at_boundary(preemption, epoch_ended)
            if epoch_ended or self._is_done():
                return
        if not fetched and state.batch_in_epoch == 0:
            raise ConfigError(f"train_data: epoch {state.epoch} yielded no batch; the training data is empty")
        # Data without a known length ends its epoch here, at the boundary of its last step.
        state.epoch += 1
        state.batch_in_epoch = 0
        self._at_boundary(preemption, epoch_ended=True)

    def _train_step(self, window: list[Any], first_index: int, preemption: PreemptionFlag) -> None:
        """One optimizer step over one window of micro-batches; booked at the next read point."""
        optimizer, state = self.optimizer, self.state
        batch_size = self.config.batch_size
        sample_counts = [
            self.dist.samples_in(self.train_data, batch, first_index + i, batch_size)
            for i, batch in enumerate(window)
        ]
        # Cut into pieces, micro-batches pair up across ranks only if each rank cuts the largest share's.
        largest_shares = (
            self.dist.largest_shares(self.train_data, first_index, len(window), batch_size)
            if self.config.micro_batch_size is not None
            else None
        )
        try:
            loss = self.backward.run(window, sample_counts, largest_shares)
        except data_mod.BatchError as exc:
            step = state.step + len(self._unbooked) + 1  # steps taken on the device are booked later
            raise data_mod.BatchError(
                f"step {step} (epoch {state.epoch}, micro-batch {first_index + (exc.index_in_window or 0)} "
                f"of the epoch): {exc}"
            ) from exc.__cause__
        samples = sum(sample_counts)
        self.precision.unscale_(optimizer)
        if self.dist.is_distributed:
            # One small all-reduce: the window's count, loss and samples, with the preemption vote on it.
            loss, samples, self._preempt_votes = self.backward.reduce_over_ranks(
                loss,
                samples,
                self.dist.step_samples(self.train_data, first_index, len(window), batch_size),
                preemption_vote(preemption.signum, self.dist.world_size),
            )
        elif loss.counts_tokens:
            self.backward.divide_grads(loss.count)
        grad_norm = self.backward.clip(self.config.max_grad_norm, self.config.clip_value)
        finite = self.guard.finite_check(loss.value, grad_norm)
        record = StepRecord(
            finite,
            loss.value,
            loss.weight,
            loss.count,
            samples,
            grad_norm,
            loss.counts_tokens,
            state.epoch,
            first_index,
        )
        # The first step of a run is checked on the host, so its optimizer state is never created by a
        # skipped step; from then on fused Adam/AdamW decide on the device, with no host read.
        if self.device_skip is not None and state.step > 0:
            if not self.device_skip.is_planned:
                self.device_skip.plan(self._read_cadence.steps_to_next_read(state.step))
            self.device_skip.arm(finite)
        elif not self.guard.is_finite(finite):
            self._discard_step(record)
            return
        else:
            record.applied = True
        self.checkpoints.wait_staged()  # the last save's copy of the optimizer state (_save)
        self.precision.step(optimizer)  # the optimizer step
        self.precision.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self._unbooked.append(record)

    def _discard_step(self, record: StepRecord) -> None:
        """A step the host check refused: no optimizer step, nothing of the run touched but the counts."""
        self.optimizer.zero_grad(set_to_none=True)
        record.applied = False
        if self.precision.uses_scaler:
            scale = self.precision.loss_scale()  # the scale this step ran at (this path has synced already)
            self.precision.update()  # records the overflow: the scale goes down
            # fp16 overflow with a finite loss is the scaler's normal skip, not a fault, while the scale is
            # at least float16's smallest normal number. An overflow below it means gradients beyond about
            # 1e9, or infinite ones, which halving cannot end: a non-finite gradient for on_nonfinite and
            # max_consecutive_skips, or the run would halve its scale forever and train nothing.
            record.scaler_skip = bool(torch.isfinite(record.loss)) and scale >= SMALLEST_LOSS_SCALE
        self._unbooked.append(record)

    def _at_boundary(self, preemption: PreemptionFlag, epoch_ended: bool) -> None:
        """Between two optimizer steps: the only place where the run's state is logged, evaluated, shown to
        callbacks and saved, and only once every step before it is booked."""
        if not self._is_read_point(preemption, epoch_ended):
            return
        state, config = self.state, self.config
        stepped = self._settle()
        if is_due(config.log_every, state.step, stepped, epoch_ended) and self.log_window.pending_steps:
            self._log_train()
        if stepped:
            self.callbacks.fire("on_step_end", self, state)
        if self.eval_data is not None and state.last_eval_step != state.step:
            eval_every = "epoch" if config.eval_every is None else config.eval_every
            if is_due(eval_every, state.step, stepped, epoch_ended):
                self._evaluate_and_track()
        if epoch_ended:
            self.callbacks.fire("on_epoch_end", self, state)
        self._agree_on_stop()
        # What committed during the steps since the last boundary, announced before this boundary's save:
        # on_checkpoint_saved after it would wait for its copy of the optimizer state (_save).
        self._announce_committed()
        # A step of unknown-length data can end its epoch one boundary later, saved again with the new epoch.
        if is_due(config.save_every, state.step, stepped or epoch_ended, epoch_ended):
            self._save()
            # A sharded save, committed in it, or a previous save it had to wait for: announced now, not a
            # boundary later (or never, if a later step raises).
            self._announce_committed()
        # Under several ranks the vote of the last step's all-reduce: read here, where every rank reads.
        votes = self._preempt_votes
        signum = preemption.signum if votes is None else voted_signal(float(votes), self.dist.world_size)
        if signum is not None:
            self._preempt(signum)

    def _is_read_point(self, preemption: PreemptionFlag, epoch_ended: bool) -> bool:
        device_skip = self.device_skip
        if device_skip is None or not device_skip.is_planned:
            return True  # every step so far was checked on the host
        return (
            epoch_ended
            or self._read_every_step
            or len(self._unbooked) >= device_skip.horizon
            # Under several ranks the vote is read at the planned read points, where every rank reads.
            or (preemption.is_set and not self.dist.is_distributed)
        )

    def _settle(self) -> bool:
        """Book every step taken since the last read point, in order (one host read for the steps decided
        on the device). Returns whether a step was applied at this boundary."""
        records, self._unbooked = self._unbooked, []
        if not records:
            return False
        deferred = [record for record in records if isinstance(record.applied, torch.Tensor)]
        if deferred:
            outcomes = self.device_skip.read([record.applied for record in deferred])
            for record, applied in zip(deferred, outcomes, strict=True):
                record.applied = applied
        state = self.state
        for record in records:
            if record.applied:
                self.guard.record_ok(state)
                self.scheduler.step()
                state.step += 1
                state.samples_seen += record.samples
                self.log_window.add(
                    record.loss,
                    record.loss_count,
                    record.samples,
                    record.grad_norm,
                    weight=record.loss_weight,
                    counts_tokens=record.counts_tokens,
                )
                self.progress.step()
            elif record.scaler_skip:
                state.scaler_skips += 1
            else:
                self.guard.record_skip(
                    state,
                    self.checkpoints.last_good_checkpoint,
                    "loss or gradient",
                    position=(record.epoch, record.batch_in_epoch),
                )
                self.progress.message(
                    f"skipped step {state.step + 1}: non-finite loss or gradient "
                    f"({state.nonfinite_skips} skipped so far)"
                )
        return bool(records[-1].applied)

    # ------------------------------------------------------------------------------------- at boundaries
    def _log(self, row: dict[str, Any]) -> None:
        """Write a row to metrics.jsonl, every logger and ``on_log``; diagnostics read it (its numbers are on
        the host already), and each finding follows it the same way."""
        row.setdefault("time_s", self.log_window.time_s())
        self._write_row(row)
        self._rows_logged += 1
        for finding in self.diagnostics.observe(row) if self.diagnostics is not None else ():
            self._write_row(finding)
            console.warn(str(finding.get("message", finding)))
            if finding["diagnostic"] in self.config.stop_on:
                self.request_stop(f"diagnostic {finding['diagnostic']}: {finding.get('message', '')}")

    def _write_row(self, row: dict[str, Any]) -> None:
        self.run_directory.log(row)
        self.progress.log(row)
        # Where rows are written: rank 0. A copy, so a callback cannot change what diagnostics read next.
        if self.dist.is_main and self.callbacks.has("on_log"):
            self.callbacks.fire("on_log", self, self.state, dict(row))

    def _log_start(self, resumed_from: str | None) -> None:
        """The start-up summary: two console lines (rank 0, whatever ``progress`` says) and the start row."""
        row = start_row(
            self.model, self.config, self.horizons, self.train_data, self.device, self.state, resumed_from
        )
        if self.dist.is_main:
            for line in format_start(row):
                self.progress.notice(line)
        self._log(row)
        if resumed_from is not None:
            # The restored checkpoint holds this boundary. The start row belongs to this attempt, not to the
            # trajectory: alone it is no reason to save the same step again (a rerun finished run stays as it
            # was), and a later resume cuts it off and writes its own.
            self._saved_at = self._boundary_key()

    def _log_train(self) -> None:
        row = self.log_window.row(self.state, self.optimizer.param_groups[0]["lr"])
        row["memory_mb"], row["peak_memory_mb"] = memory_mb(self.device)
        if self._lr_factor is not None:
            row["scheduled_lr"] = self.scheduler.base_lrs[0] * self._lr_factor(self.state.step)
        if self.precision.uses_scaler:
            row["loss_scale"] = self.precision.loss_scale()
        self._log(row)

    def _evaluate_and_track(self, track: bool = True) -> None:
        """Evaluate, log, fire ``on_evaluate``; with ``track``, best tracking, early stopping and the
        ``keep_best`` checkpoints (``eval_on_start`` does not track: untrained weights are no candidate)."""
        state = self.state
        started = time.perf_counter()
        scores = self.evaluate()
        self.log_window.exclude(time.perf_counter() - started)  # evaluation time is not training time
        state.last_eval_step = state.step
        self.last_metrics = scores
        self._log({"kind": "eval", "step": state.step, "epoch": state.epoch, **scores})
        self.callbacks.fire("on_evaluate", self, state, scores)
        if self.tracker is None or not track:
            return
        if self.tracker.update(state, scores):
            state.best_checkpoint = str(self.checkpoints.path_for(state.step))
        if self.tracker.keep(state, scores, self.config.keep_best):
            kept = [step for step, _ in state.kept_best]
            arguments = self._save_arguments()
            if self.checkpoints.hold_best(state.step, self._checkpointed, **arguments, still_kept=kept):
                self._saved_at = self._boundary_key()

    def _save(self) -> None:
        """Checkpoint this boundary, unless the last checkpoint holds it already (its step again, with a
        state that changed since, e.g. by a final row or the end of an epoch, replaces it)."""
        here = self._boundary_key()
        if self._saved_at == here:
            return
        self.checkpoints.save(
            self.state.step,
            self._checkpointed,
            **self._save_arguments(),
            copy_later=self._written_by_the_optimizer_step(),
        )
        self._saved_at = here

    def _written_by_the_optimizer_step(self) -> list[torch.Tensor]:
        """The optimizer's state, which nothing but its ``step()`` writes: a save leaves its copy to the
        writer thread, overlapping the next step's forward and backward, and the loop waits for that copy
        before the next optimizer step (``_train_step``) or any callback. The weights are copied at once: a
        forward may write them (an Embedding with ``max_norm`` renormalises its rows in place), and so are
        state tensors that share a weight's memory (an optimizer keeping an alias of its parameter)."""
        if self.dist.is_sharded:
            return []  # sharded saves write from the live shards, synchronously
        # detach(): a Parameter subclass's memory as the plain tensor its state_dict() entry is.
        weights = {memory_of(parameter.detach()) for parameter in self.model.parameters()}
        return [
            value
            for per_parameter in self.optimizer.state.values()
            for value in per_parameter.values()
            if isinstance(value, torch.Tensor) and memory_of(value) not in weights
        ]

    def _boundary_key(self) -> tuple[str, int]:
        state = self.state.to_dict()
        del state["stop_reason"]  # worded per rank when a stop comes from rank 0's diagnostics
        return json.dumps(state, sort_keys=True), self._rows_logged

    def _agree_on_stop(self) -> None:
        """Diagnostics and ``on_log`` run on rank 0 alone: a stop they ask for reaches every rank (one
        all-reduce, only with ``stop_on`` or an ``on_log`` callback), before any rank decides to save or to
        go on."""
        if not (self._rank_zero_may_stop and self.dist.is_distributed):
            return
        if self.dist.any_rank(self.state.should_stop, self.device) and not self.state.should_stop:
            self.request_stop("stopped on rank 0 (diagnostics or an on_log callback)")

    def _save_arguments(self) -> dict[str, Any]:
        state = self.state
        protect = [self.checkpoints.path_for(step) for step, _ in state.kept_best]
        if state.best_checkpoint:
            protect.append(Path(state.best_checkpoint))
        return {"extra_files": {CONFIG_FILE: self._config_yaml}, "protect": protect}

    def _announce_committed(self) -> None:
        for path in self.checkpoints.pop_committed():
            self.callbacks.fire("on_checkpoint_saved", self, self.state, path)

    def _preempt(self, signum: int) -> None:
        """A signal reached some rank: checkpoint this boundary, wait for the commit, exit 143 or 130 (every
        rank alike: SIGTERM if it reached any rank)."""
        self._save()
        self.checkpoints.wait()
        self._announce_committed()
        where = self.checkpoints.last_checkpoint
        if self.dist.is_main:
            console.notice(f"preempted by signal {int(signum)}; checkpoint {where} written")
        raise Preempted(signum, where)

    def _finish(self) -> None:
        """Final row, evaluation and checkpoint; the best weights if asked; RUN_DIR/final/."""
        state = self.state
        self._settle()
        if self.log_window.pending_steps:
            self._log_train()
        if self.eval_data is not None and state.last_eval_step != state.step:
            self._evaluate_and_track()
        self._agree_on_stop()
        self._save()
        self.checkpoints.wait()
        self._announce_committed()
        if self.config.load_best_at_end and state.best_checkpoint:
            self.checkpoints.read_model(state.best_checkpoint, self._checkpointed["model"])
        weights = self.dist.model_state(self.model)  # a collective under FSDP
        is_hf = hasattr(self.model, "save_pretrained") and hasattr(self.model, "config")
        self.run_directory.write_final(
            weights,
            state.step,
            hf_model=self.model if is_hf else None,
            ema_weights=self.ema.state_dict_of_module() if self.ema is not None else None,
        )
        self._log(state.summary_row())

    def _close_loaders(self) -> None:
        """Stop the fit's worker processes; an evaluate() after the fit starts its own."""
        self._train_batches.close()
        if self._eval_batches is not None:
            self._eval_batches.close()
            self._eval_batches = None

    def _leave_wrapper(self) -> None:
        # A DDP wrapper holds the process group. Once fit() ends nothing of ours keeps it, so the group
        # really ends when destroyed (its gloo threads joined while Python is whole; see
        # distributed.destroy_group). A later fit() wraps the model again.
        self.backward.model = self.model

    # ------------------------------------------------------------------------------------- set-up
    def _prepare(self) -> None:
        config = self.config
        if config.ema_decay and self.dist.strategy == "fsdp":
            raise ConfigError("ema_decay: not supported with strategy=fsdp (the average would need sharding)")
        enable_gradient_checkpointing(self.model, config.gradient_checkpointing)
        # Wrap before building the optimizer: FSDP2 replaces the parameters by sharded ones in place.
        wrapped = self.dist.wrap(self.model, config.precision, tuple(config.fsdp_blocks))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("model: it has no parameter with requires_grad=True; there is nothing to train")
        self.optimizer = resolve_optimizer(self.model, config, self._user_optimizer)
        self.horizons = compute_horizons(config, self.train_data, self.dist.world_size)
        self._warn_if_epochs_cut_max_steps()
        self.scheduler = resolve_scheduler(
            self.optimizer, config, self.horizons.total_steps, self._user_scheduler
        )
        train_model = wrapped
        if self._user_compiled is not None and wrapped is self.model:
            train_model = self._user_compiled  # the user's own compile options, over the same module
        elif config.compile:
            train_model = torch.compile(wrapped)
        self.backward = WindowBackward(
            train_model,
            self.loss_fn,
            self.precision,
            self.dist,
            params,
            micro_batch_size=config.micro_batch_size,
            on_out_of_memory=self.progress.message,
        )
        self.ema = WeightEMA(self.model, config.ema_decay) if config.ema_decay else None
        # EMA and fp16's GradScaler read the host every step anyway; they keep the host-side check.
        host_bound = self.ema is not None or self.precision.uses_scaler
        self.device_skip = DeviceSkip.for_run(self.optimizer, self.scheduler, config.on_nonfinite, host_bound)
        # A callback on every step sees each step's exact state, so every step is a read point; under
        # several ranks every rank must read at the same steps (the preemption vote rides on the reads).
        self._read_every_step = self.dist.any_rank(self.callbacks.has("on_step_end"), self.device)
        may_stop = bool(config.stop_on) or self.callbacks.has("on_log")
        self._rank_zero_may_stop = self.dist.any_rank(may_stop, self.device)
        eval_every = config.eval_every if self.eval_data is not None else None
        # "epoch" cadences need no planned read: the end of an epoch is always one.
        cadences = (config.log_every, eval_every, config.save_every)
        intervals = tuple(every if isinstance(every, int) else None for every in cadences)
        self._read_cadence = ReadCadence(intervals, config.max_steps)
        if config.diagnostics and self.dist.is_main:
            self.diagnostics = Diagnostics(config, self.horizons.total_steps)
        # Our schedule's own factor (the LambdaLR's), so logged rows can say what the lr should be.
        self._lr_factor = self.scheduler.lr_lambdas[0] if self._user_scheduler is None else None
        self.log_window = LogWindow(self.device)

    def _components(self) -> dict[str, Stateful]:
        """Everything a checkpoint holds, by name, in the order a resume restores it: the one list that
        saving and restoring both iterate."""
        model = self.model
        components: dict[str, Stateful] = {
            "identity": RunIdentity(
                self.config, self.dist, self.train_data, model, self.optimizer, self.ema is not None
            ),
            "model": (
                ShardedWeights(self.dist, model, self.optimizer)
                if self.dist.is_sharded
                else ModelWeights(self.dist, model)
            ),
            "optimizer": OptimizerState(self.dist, model, self.optimizer),
            "scheduler": self.scheduler,
            "precision": self.precision,
            "trainer_state": self.state,
            "window": self.log_window,
            "rng": RankRNG(self.dist),
        }
        if not self._train_batches.order_is_ours:
            components["data_streams"] = RankDataStreams(self.dist, self._train_batches)
        if self.ema is not None:
            components["ema"] = self.ema
        if self.diagnostics is not None:
            components["diagnostics"] = self.diagnostics
        stateful = [cb for cb in self.callbacks.callbacks if CallbackState.keeps_state(cb)]
        for callback in stateful:
            kind = type(callback)
            name = f"callback {kind.__module__}.{kind.__qualname__}"
            same_kind = [cb for cb in stateful if type(cb) is kind]
            if len(same_kind) > 1:
                name += f" {same_kind.index(callback)}"
            components[name] = CallbackState(callback, warns=self.dist.is_main)
        # The row count of metrics.jsonl, cut back to it once every rank restored everything (_resume).
        components["metrics"] = self.run_directory
        return components

    def _warn_if_epochs_cut_max_steps(self) -> None:
        """A max_steps the default max_epochs cuts short: the Hugging Face Trainer and Lightning let a given
        max_steps decide alone, so say it once, on rank 0, before training."""
        config, total = self.config, self.horizons.total_steps
        explicit = config.model_fields_set
        if not (
            self.dist.is_main
            and config.max_steps is not None
            and config.max_epochs is not None
            and "max_steps" in explicit
            and "max_epochs" not in explicit
        ):
            return
        if self.horizons.steps_per_epoch is None:  # data without a length: its epochs end when it runs out
            console.warn(
                f"max_steps={config.max_steps}, but max_epochs={config.max_epochs} (its default) also ends "
                f"the run, after {config.max_epochs} passes over train_data, which has no length: the "
                "schedule is planned over max_steps; set max_epochs=null to train for max_steps"
            )
        elif total < config.max_steps:
            console.warn(
                f"max_steps={config.max_steps}, but max_epochs={config.max_epochs} (its default) ends the "
                f"run at step {total}; set max_epochs=null to train for max_steps"
            )

    def _resume(self) -> str | None:
        """Restore every component from a checkpoint (``resume``), or start fresh; say which. Returns the
        checkpoint restored, or None (the start row's ``resumed_from``, see :meth:`_log_start`)."""
        path = self.checkpoints.restore(self._checkpointed, self.config.resume, upgrade=upgrade_legacy_states)
        if path is None and self._trained_before and self.checkpoints.started_from is None:
            raise ConfigError(
                f"fit(): an earlier fit() of this Trainer trained its model to step {self.state.step} and "
                f"stopped, and no checkpoint in {self.config.run_dir} holds it to continue from; build a "
                "new model and Trainer to start over (with save_every, a rerun continues from the last "
                "checkpoint instead)"
            )
        if path is None:
            self.run_directory.start_fresh()
        else:
            self.run_directory.cut_back()
            self.last_metrics = self.run_directory.last_eval_scores()
            self._adopt_restored_best()
            reapply_schedule(self.scheduler)  # this run's horizon from the restored step on
        self.run_directory.open_loggers()
        show = self.config.progress and self.dist.is_main
        self.progress = Progress(show, self.horizons.total_steps, initial_step=self.state.step)
        self.backward.on_out_of_memory = self.progress.message
        if self.dist.is_main and path is not None:
            self.progress.notice(f"resumed from {path} at step {self.state.step}")
            if self.state.should_stop:  # a stop is part of the run's state: say why nothing trains
                self.progress.notice(
                    f"the run had stopped early ({self.state.stop_reason or 'a stop request'}) and stays "
                    "stopped: this fit trains no further"
                )
        elif self.dist.is_main and self.checkpoints.started_from is not None:
            self.progress.notice(
                f"fine-tuning from the weights of {self.checkpoints.started_from}: another experiment's "
                "checkpoint, so step 0 with a fresh optimizer, schedule and data order"
            )
        return None if path is None else str(path)

    def _adopt_restored_best(self) -> None:
        """The restored best tracking, as this run judges and finds it: forgotten (with a notice) when another
        metric or direction judged it, and its checkpoint looked up in this run's directory, since the state
        saved the path it had then (the run directory may have moved, or a relative run_dir be read from
        another directory)."""
        state = self.state
        forgotten = self.tracker.take_over(state) if self.tracker is not None else None
        if forgotten is not None and self.dist.is_main:
            console.notice(
                f"metric_for_best: the checkpoint's best was judged by {forgotten}, this run by "
                f"{self.tracker.judged_by}; best tracking and early stopping start over"
            )
        best_step = step_of(Path(state.best_checkpoint).name) if state.best_checkpoint else None
        if best_step is not None:
            state.best_checkpoint = str(self.checkpoints.path_for(best_step))

    def _fast_dev_run_dir(self) -> str:
        """A scratch run directory for ``fast_dev_run`` (removed at the end): a debugging run never touches
        ``run_dir``, so it can neither resume nor overwrite a real run there."""
        path = tempfile.mkdtemp(prefix="steadyfit-fast-dev-run-") if self.dist.is_main else None
        self._scratch_dir = Path(self.dist.broadcast_object(path))
        if self.dist.is_main:
            batches = self.config.limit_train_batches
            console.notice(
                f"fast_dev_run: {batches} training and {batches} eval batch(es) in {self._scratch_dir}, "
                f"removed at the end; {self.config.run_dir} is untouched"
            )
        return str(self._scratch_dir)

    @contextlib.contextmanager
    def _scratch_removed(self) -> Iterator[None]:
        """Remove ``fast_dev_run``'s scratch directory when the run ends, whichever way (entered first, so
        it runs after the run directory closed its loggers and lock)."""
        try:
            yield
        finally:
            if self._scratch_dir is not None and self.dist.is_main:
                shutil.rmtree(self._scratch_dir, ignore_errors=True)

    def _is_done(self) -> bool:
        state, config = self.state, self.config
        if state.should_stop:
            # A callback may set should_stop itself (documented beside request_stop): say so.
            state.stop_reason = state.stop_reason or "stop requested by a callback (state.should_stop)"
            return True
        if config.max_steps is not None and state.step >= config.max_steps:
            return True
        return config.max_epochs is not None and state.epoch >= config.max_epochs

    def _result(self) -> FitResult:
        state = self.state
        return FitResult(
            global_step=state.step,
            epoch=state.epoch,
            train_loss=self.log_window.run_mean(),
            metrics=dict(self.last_metrics),
            best_metric=state.best_metric,
            best_checkpoint=state.best_checkpoint if self._scratch_dir is None else None,
            best_step=state.best_step,
            nonfinite_skips=state.nonfinite_skips,
            scaler_skips=state.scaler_skips,
            stop_reason=state.stop_reason,
            run_dir=str(Path(self.config.run_dir)),
        )


def is_due(every: int | str | None, step: int, stepped: bool, epoch_ended: bool) -> bool:
    """Whether a cadence (``log_every``, ``eval_every``, ``save_every``) fires at this boundary: ``"epoch"``
    at the end of every epoch, N when an applied step's count is a multiple of N, 0 or None never.

    Example:
        >>> is_due(10, 20, True, False), is_due("epoch", 20, True, False), is_due(0, 20, True, True)
        (True, False, False)
    """
    if every == "epoch":
        return epoch_ended
    return stepped and bool(every) and step % every == 0


def _as_train_config(config: Any) -> TrainConfig:
    """The Trainer's ``config`` argument as a TrainConfig, or a ConfigError saying what to pass."""
    if isinstance(config, TrainConfig):
        return config
    if config is None or isinstance(config, Mapping):
        return make_config(dict(config or {}))
    if callable(getattr(config, "to_dict", None)) and hasattr(config, "per_device_train_batch_size"):
        raise ConfigError(
            f"config: got a Hugging Face {type(config).__name__}; pass TrainConfig.from_hf(args), which "
            f"translates it ({MIGRATING_DOC})"
        )
    raise ConfigError(f"config: expected a TrainConfig or a dict of its fields, got {type(config).__name__}")


def _check_metrics(metrics: Any) -> None:
    """``metrics`` is a dict of name to metric; a single function (a Hugging Face ``compute_metrics``, say)
    is refused with what to pass instead."""
    if isinstance(metrics, Mapping):
        for name, metric in metrics.items():
            if not (callable(metric) or is_torchmetric(metric)):
                raise ConfigError(
                    f"metrics: {name!r} is a {type(metric).__name__}, not a metric; pass a function "
                    "fn(outputs, targets) returning a mean or (sum, count) (steadyfit.accuracy, say) or a "
                    "torchmetrics Metric"
                )
    if metrics is None or isinstance(metrics, Mapping):
        return
    raise ConfigError(
        f"metrics: expected a dict of name to metric, e.g. metrics={{'accuracy': steadyfit.accuracy}}, got "
        f"{type(metrics).__name__}; each metric is fn(outputs, targets) returning a mean or (sum, count), "
        f"or a torchmetrics Metric (a Hugging Face compute_metrics(eval_pred) is not one: {MIGRATING_DOC})"
    )
