"""The run directory: lock, config.yaml, metrics and loggers, checkpoints (save, resume), final weights.

Everything fit() writes to disk goes through here, so the loop in trainer.py stays about training.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import save as save_safetensors

from steadyfit.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointError,
    CheckpointStore,
    RunLock,
    RunLockedError,
)
from steadyfit.checkpoint.atomic import replace_file
from steadyfit.checkpoint.layout import CHECKPOINTS_DIR, step_dir_name
from steadyfit.checkpoint.payload import prepare_tensors
from steadyfit.checkpoint.payload import snapshot as payload_snapshot
from steadyfit.checkpoint.sharded import load_shards, save_sharded, split_state
from steadyfit.checkpoint.store import LoadedCheckpoint
from steadyfit.config import ConfigError
from steadyfit.data import dataset_length
from steadyfit.loggers.base import Logger
from steadyfit.loggers.jsonl import JsonlLogger, truncate_history
from steadyfit.loggers.progress import Progress
from steadyfit.loggers.registry import build_loggers
from steadyfit.rng import capture_rng, restore_rng
from steadyfit.secrets import redact
from steadyfit.signals import Preempted
from steadyfit.state import TrainState

if TYPE_CHECKING:
    from steadyfit.trainer import Trainer

CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
FINAL_MODEL_FILE = "model.safetensors"
FINAL_EMA_FILE = "ema.safetensors"
# The checkpoint component holding trainer state, optimizer, scheduler, scaler, RNG, EMA and diagnostics.
STATE_COMPONENT = "state"


def write_weights(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Write a safetensors file atomically (temporary name, fsync, rename)."""
    replace_file(path, save_safetensors(tensors, metadata={"step": str(step)}))


class RunDirectory:
    """One run directory, one writer: the lock, the loggers, the checkpoint store and the final weights."""

    def __init__(self, trainer: Trainer, total_steps: int | None) -> None:
        self.trainer = trainer
        self.dist = trainer.dist
        self.is_main = trainer.dist.is_main
        self.config = trainer.config
        self.path = Path(self.config.run_dir)
        self.total_steps = total_steps
        self.store = CheckpointStore(self.path)
        self.writer = AsyncCheckpointWriter(self.store)
        self.lock = RunLock(self.path)
        self.loggers: list[Logger] = []
        self.progress = Progress(False, total_steps)
        self.last_checkpoint: str | None = None
        self.last_saved_step: int | None = None
        self._committed: list[str] = []
        self._pending_best: tuple[int, tuple[Any, ...] | None] | None = None
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RunDirectory:
        # Rank 0 alone writes to the run directory; the others learn whether it could start.
        error: BaseException | None = None
        if self.is_main:
            try:
                self._open()
            except (ConfigError, CheckpointError, RunLockedError, OSError) as exc:
                error = exc
        error = self.dist.broadcast_object(error)
        if error is not None:
            raise error
        return self

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            self.store.cleanup_stray()
            config_data = redact(self.config.to_yaml_dict())
            replace_file(self.path / CONFIG_FILE, yaml.safe_dump(config_data, sort_keys=False).encode())
            self.loggers = [
                JsonlLogger(self.path),
                *build_loggers(self.config.loggers, str(self.path), config_data),
            ]
            for logger in self.loggers:
                logger.log_params(config_data)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.is_main:
            return
        try:
            self.writer.close()
        finally:
            self.progress.close()
            for logger in self.loggers:
                logger.close()
            self.lock.__exit__(exc_type, exc, tb)

    def log(self, row: dict[str, Any]) -> None:
        row.setdefault("time_s", round(time.perf_counter() - self.started, 3))
        self._write(row)
        diagnostics = self.trainer.diagnostics
        if diagnostics is None or row.get("kind") not in ("train", "eval"):
            return
        # Diagnostics read numbers already on the host (this row): no synchronisation of their own.
        for finding in diagnostics.observe(row):
            self._write(finding)
            if finding.get("first_seen", True):
                # A warning is printed even with progress=false: it is not progress.
                print(f"steadyfit: warning: {finding.get('message', finding)}", file=sys.stderr, flush=True)
            if finding.get("diagnostic") in self.config.stop_on:
                self.trainer.request_stop(f"diagnostic {finding['diagnostic']}: {finding.get('message', '')}")

    def _write(self, row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_row(row)
        self.progress.log(row)

    # ------------------------------------------------------------------------------------ resume
    def resume_or_start(self) -> None:
        """Restore the newest good checkpoint (``resume=auto``), a named one (PATH), or start fresh.

        Rank 0 chooses; every rank loads the same checkpoint.
        """
        choice: Path | BaseException | None = None
        if self.is_main:
            try:
                choice = self._choose_checkpoint()
            except (ConfigError, CheckpointError) as exc:
                choice = exc
        choice = self.dist.broadcast_object(choice)
        if isinstance(choice, BaseException):
            raise choice
        path = choice
        self.progress = Progress(self.config.progress and self.is_main, self.total_steps)
        if path is None:
            if self.is_main:
                truncate_history(self.path, 0)
            return
        self._load(path)
        if self.is_main:
            truncate_history(self.path, self.trainer.state.step)
        self.progress.close()
        self.progress = Progress(
            self.config.progress and self.is_main, self.total_steps, initial_step=self.trainer.state.step
        )
        self.progress.message(f"steadyfit: resumed from {path} at step {self.trainer.state.step}")

    def _choose_checkpoint(self) -> Path | None:
        mode = self.config.resume
        existing = self.store.list_checkpoints()
        if mode == "never":
            if existing:
                raise ConfigError(
                    f"resume: 'never' but {self.path / 'checkpoints'} holds {len(existing)} checkpoint(s); "
                    "use another run_dir or resume=auto (nothing was deleted)"
                )
            path = None
        elif mode == "auto":
            path, damaged = self.store.latest_good()
            for bad_path, faults in damaged:
                print(f"steadyfit: skipping damaged checkpoint {bad_path}: {'; '.join(faults)}", flush=True)
            if path is None and existing:
                listing = "; ".join(f"{p}: {', '.join(self.store.verify(p))}" for p in existing)
                raise CheckpointError(
                    f"resume=auto: every checkpoint in {self.path / 'checkpoints'} is damaged ({listing}); "
                    "refusing to restart from step 0 over them: move them away or pass resume=PATH"
                )
        else:
            path = Path(mode)
            if not path.is_dir():
                raise ConfigError(f"resume: {mode!r} is not a checkpoint directory")
        return path

    def _load(self, path: Path) -> None:
        trainer = self.trainer
        checkpoint = self._read_checkpoint(path)
        if STATE_COMPONENT not in checkpoint.components:
            raise CheckpointError(
                f"checkpoint {path} has no {STATE_COMPONENT!r} component (it holds "
                f"{sorted(checkpoint.components)}): it was written by an older steadyfit layout that this "
                "version cannot resume; start a new run_dir, or resume=never after moving checkpoints/ away"
            )
        components = checkpoint.components[STATE_COMPONENT]
        saved_config = yaml.safe_load(checkpoint.extra_files.get(CONFIG_FILE, b"{}")) or {}
        state = TrainState.from_dict(components["trainer_state"])
        saved_world = int(state.extra.get("world_size", 1))
        self._check_compatible(path, saved_config, saved_world)
        # A full checkpoint loads under any strategy (FSDP scatters it); a sharded one needs FSDP's layout.
        if checkpoint.shards_dir is not None and not self.dist.is_sharded:
            raise ConfigError(
                f"strategy: the checkpoint {path} is sharded (written with strategy=fsdp); resume it with "
                "strategy=fsdp under torchrun (any world size that keeps the global batch)"
            )
        saved_length = state.extra.get("dataset_length")
        length = dataset_length(trainer.train_data)
        if saved_length is not None and length is not None and saved_length != length:
            raise ConfigError(
                f"train_data: the checkpoint {path} was trained on {saved_length} samples, this run has "
                f"{length}; resuming would not be exact. Use the same data or a new run_dir"
            )
        if checkpoint.shards_dir is not None:
            self._load_shards(checkpoint.shards_dir, components["optimizer"])
        else:
            self.dist.load_model_state(trainer.model, checkpoint.model_state)
            self.dist.load_optimizer_state(trainer.model, trainer.optimizer, components["optimizer"])
        trainer.scheduler.load_state_dict(components["scheduler"])
        trainer.precision.load_state_dict(components.get("precision", {}))
        if trainer.ema is not None:
            if "ema" not in components:
                raise ConfigError(
                    f"ema_decay: the checkpoint {path} holds no EMA weights; resume without ema_decay"
                )
            trainer.ema.load_state_dict(components["ema"])
        rng_states = components["rng"]["ranks"]
        # Same world size: each rank continues its own streams. A resharded FSDP resume (other world size)
        # continues correctly but not bitwise: there is no saved stream for a new rank.
        if trainer.diagnostics is not None and "diagnostics" in components:
            trainer.diagnostics.load_state_dict(components["diagnostics"])
        restore_rng(rng_states[self.dist.rank] if self.dist.rank < len(rng_states) else rng_states[0])
        trainer.state = state
        trainer.window_stats.load_state_dict(state.extra.get("window_stats", {}))
        self.last_checkpoint = str(path)
        self.last_saved_step = state.step

    def _read_checkpoint(self, path: Path) -> LoadedCheckpoint:
        """Verify and read a checkpoint on every rank; all of them raise if any failed.

        Rank 0 hashes a sharded checkpoint's shard files; the others check their sizes (the coordinator's
        verdict reaches them here, before any rank reads a shard).
        """
        checkpoint, error = None, None
        try:
            checkpoint = self.store.open(path, hash_shards=self.is_main)
        except CheckpointError as exc:
            error = exc
        failures = [message for message in self.dist.gather_objects(str(error) if error else None) if message]
        if error is not None:
            raise error
        if failures:
            raise CheckpointError(f"another rank could not read {path}: {'; '.join(failures)}")
        assert checkpoint is not None
        return checkpoint

    def _load_shards(self, shards_dir: Path, optimizer_structure: Any | None) -> None:
        """Every rank loads its shards of a verified sharded checkpoint (resharded if the world size changed).

        ``optimizer_structure`` None loads the model alone (see :func:`load_shards`).
        """
        optimizer = self.trainer.optimizer if optimizer_structure is not None else None
        where = f"{shards_dir.parent}: the optimizer state of component {STATE_COMPONENT!r}"
        try:
            load_shards(
                self.dist, shards_dir, self.trainer.model, optimizer, optimizer_structure, where=where
            )
        except CheckpointError as exc:  # raised on every rank together, naming the failed ranks
            raise CheckpointError(f"could not load the shards of {shards_dir.parent}: {exc}") from exc

    def _check_compatible(self, path: Path, saved: dict[str, Any], saved_world: int) -> None:
        """Refuse what would silently break exactness; extending max_steps / max_epochs is allowed."""
        config, world = self.config, self.dist.world_size
        checks = [
            ("seed", saved.get("seed", config.seed), config.seed),
            (
                "grad_accum_steps",
                saved.get("grad_accum_steps", config.grad_accum_steps),
                config.grad_accum_steps,
            ),
            # The global batch fixes which samples each step sees; a resharded run must keep it.
            (
                "batch_size",
                saved.get("batch_size", config.batch_size) * saved_world,
                config.batch_size * world,
            ),
        ]
        for field, before, now in checks:
            if before != now:
                what = "global batch (batch_size x world size)" if field == "batch_size" else field
                raise ConfigError(
                    f"{field}: the checkpoint {path} was trained with {what} {before!r}, this run asks for "
                    f"{now!r}; resuming would not be exact. Use the same value or a new run_dir "
                    "(extending max_steps / max_epochs is allowed)"
                )
        if saved_world != world and self.dist.strategy != "fsdp":
            raise ConfigError(
                f"world size: the checkpoint {path} was written by {saved_world} rank(s), this run has "
                f"{world}; only strategy=fsdp resumes on another world size (with the same global batch)"
            )

    # ------------------------------------------------------------------------------------ saving
    def save_if_due(self) -> None:
        """The periodic save (every ``save_every`` optimizer steps)."""
        every = self.config.save_every
        step = self.trainer.state.step
        if every and step % every == 0 and self.last_saved_step != step:
            self.save()
        self.fire_committed()

    def save_best(self) -> None:
        """Evaluation improved: this step's state becomes the best checkpoint.

        The state is copied to host memory now and committed at the next save point (``save_every``,
        preemption, the end), unless a better one replaces it first: a run that improves at every
        evaluation writes one best checkpoint, not one per evaluation. A crash before that save point loses
        nothing a resume does not recompute: the resumed run replays the same evaluations.

        Sharded (FSDP) checkpoints are written right away instead: holding every rank's shards in host
        memory until the next save point would cost as much memory as the training state itself.
        """
        state = self.trainer.state
        state.best_checkpoint = str(self._checkpoint_path(state.step))
        if self.dist.is_sharded:
            self._pending_best = None
            if self.last_saved_step != state.step:
                self._save_sharded(state.step)
            return
        captured = self._capture()
        self._pending_best = None
        if captured is not None:
            model_state, components, extra_files, protect = captured
            # Host copies (the training goes on mutating the originals); cost: one copy of the state.
            copied = (payload_snapshot(model_state), payload_snapshot(components), extra_files, protect)
            self._pending_best = (state.step, copied)
        else:
            self._pending_best = (state.step, None)  # other ranks: only the bookkeeping

    def save(self) -> None:
        """Snapshot everything to host memory now; write, fsync and commit in the background.

        Every rank calls it at the same step (RNG states are gathered: a collective); rank 0 alone writes a
        full checkpoint through the background writer. A pending best checkpoint is committed first. Under
        FSDP the save is sharded and synchronous instead: every rank writes its own shard, rank 0 commits,
        and every rank returns after the commit.
        """
        step = self.trainer.state.step
        pending, self._pending_best = self._pending_best, None
        if pending is not None and pending[0] != step:
            self._submit(*pending)
        if self.last_saved_step == step:
            return
        if self.dist.is_sharded:
            self._save_sharded(step)
            return
        self._submit(step, self._capture())

    def _capture(self) -> tuple[Any, ...] | None:
        """Everything a checkpoint holds, on rank 0 (None elsewhere); a collective under several ranks."""
        trainer = self.trainer
        model_state = self.dist.model_state(trainer.model)
        optimizer_state = self.dist.optimizer_state(trainer.model, trainer.optimizer)
        captured = self._capture_components(optimizer_state)
        return None if captured is None else (model_state, *captured)

    def _save_sharded(self, step: int) -> None:
        """Every rank writes its FSDP shards of the model and optimizer; rank 0 adds the rest and commits.

        Synchronous: DCP writes straight from the live shards, so training must not move on before it is
        done (the background writer serves full checkpoints only). Returns on every rank after the commit.
        """
        trainer = self.trainer
        tensors, optimizer_structure = split_state(*self.dist.sharded_state(trainer.model, trainer.optimizer))
        captured = self._capture_components(optimizer_structure)
        components, extra_files, protect = captured if captured is not None else (None, None, [])

        def rotate(path: Path) -> None:
            self._rotate_after_commit(path, protect)

        path = save_sharded(
            self.store, self.dist, step, tensors, components, extra_files=extra_files, on_commit=rotate
        )
        self.last_checkpoint = str(path)
        self.last_saved_step = max(step, self.last_saved_step or 0)
        if self.is_main:
            self._committed.append(str(path))

    def _capture_components(self, optimizer_state: Any) -> tuple[Any, ...] | None:
        """The state component, config.yaml and the paths rotation keeps, on rank 0 (None elsewhere).

        ``optimizer_state`` is the full optimizer state, or a sharded save's JSON structure of it. A
        collective under several ranks (every rank's RNG state is gathered).
        """
        trainer, state = self.trainer, self.trainer.state
        state.extra["dataset_length"] = dataset_length(trainer.train_data)
        state.extra["world_size"] = self.dist.world_size
        state.extra["window_stats"] = trainer.window_stats.state_dict()
        rng_states = self.dist.gather_objects(capture_rng())
        if not self.is_main:
            return None
        components = {
            "optimizer": optimizer_state,
            "scheduler": trainer.scheduler.state_dict(),
            "precision": trainer.precision.state_dict(),
            "trainer_state": state.to_dict(),
            "rng": {"ranks": rng_states},
        }
        if trainer.ema is not None:
            components["ema"] = trainer.ema.state_dict()
        if trainer.diagnostics is not None:
            components["diagnostics"] = trainer.diagnostics.state_dict()
        extra_files = {
            CONFIG_FILE: yaml.safe_dump(redact(self.config.to_yaml_dict()), sort_keys=False).encode()
        }
        protect = [Path(state.best_checkpoint)] if state.best_checkpoint else []
        # Everything but the weights in one component: state.json + state.safetensors (fewer files to fsync).
        return {STATE_COMPONENT: components}, extra_files, protect

    def _submit(self, step: int, snapshot: tuple[Any, ...] | None) -> None:
        """Hand a captured state to the writer (rank 0); every rank records that this step is saved."""
        self.last_checkpoint = str(self._checkpoint_path(step))
        self.last_saved_step = max(step, self.last_saved_step or 0)
        if not self.is_main or not snapshot:
            return
        model_state, components, extra_files, protect = snapshot

        def committed(path: Path) -> None:
            # Runs in the writer thread, after the commit; user callbacks are fired later, on the main thread.
            self._rotate_after_commit(path, protect)
            self._committed.append(str(path))

        self.writer.submit(step, model_state, components, extra_files, on_done=committed)

    def _rotate_after_commit(self, path: Path, protect: list[Path]) -> None:
        """Apply ``keep_last`` after ``path`` was committed (rank 0), taking ``path`` as the newest good one.

        Best effort: the checkpoint is committed, so a failure here (e.g. a directory that cannot be
        removed) is printed as a warning and the save still counts; the next save rotates again.
        """
        try:
            self.store.rotate(self.config.keep_last, protect=protect, known_good=path)
        except Exception as exc:
            print(
                f"steadyfit: warning: checkpoint {path} is committed, but rotating older checkpoints "
                f"(keep_last={self.config.keep_last}) failed: {exc}",
                file=sys.stderr,
                flush=True,
            )

    def wait_for_commit(self) -> None:
        """Block until the last save is committed; every rank returns only after rank 0's commit."""
        if self.is_main:
            self.writer.wait()
            self.fire_committed()
        self.dist.barrier()

    def fire_committed(self) -> None:
        """Tell callbacks about checkpoints the writer has committed since the last call."""
        while self._committed:
            path = self._committed.pop(0)
            trainer = self.trainer
            trainer.callbacks.fire("on_checkpoint_saved", trainer, trainer.state, path)

    def preempt(self, signum: int | None) -> None:
        """A signal reached some rank: checkpoint this step boundary, wait for the commit, exit 143 or 130."""
        self.save()
        self.wait_for_commit()
        signum = signum or signal.SIGTERM
        # Printed even with progress=false: the user needs to know where the run stopped.
        message = f"steadyfit: preempted by signal {int(signum)}; checkpoint {self.last_checkpoint} written"
        if self.is_main:
            print(message, file=sys.stderr, flush=True)
        raise Preempted(signum, self.last_checkpoint)

    def finish(self) -> None:
        """Final checkpoint, best weights if asked, and RUN_DIR/final/model.safetensors."""
        trainer, state = self.trainer, self.trainer.state
        self.save()
        self.wait_for_commit()
        if self.config.load_best_at_end and state.best_checkpoint:
            best = self._read_checkpoint(Path(state.best_checkpoint))
            if best.shards_dir is not None:
                self._load_shards(best.shards_dir, None)
            else:
                self.dist.load_model_state(trainer.model, best.model_state)
        final_weights = self.dist.model_state(trainer.model)
        if not self.is_main:
            return
        final_dir = self.path / FINAL_DIR
        final_dir.mkdir(exist_ok=True)
        final_path = final_dir / FINAL_MODEL_FILE
        write_weights(final_path, prepare_tensors(final_weights), step=state.step)
        if hasattr(trainer.model, "save_pretrained") and hasattr(trainer.model, "config"):
            # Hugging Face models: config.json and weights that from_pretrained(RUN_DIR/final) loads.
            trainer.model.save_pretrained(str(final_dir), state_dict=final_weights, safe_serialization=True)
        if trainer.ema is not None:
            write_weights(
                final_dir / FINAL_EMA_FILE,
                prepare_tensors(trainer.ema.state_dict_of_module()),
                step=state.step,
            )
        summary = {
            "kind": "summary",
            "step": state.step,
            "epoch": state.epoch,
            "best_metric": state.best_metric,
            "best_step": state.best_step,
            "nonfinite_skips": state.nonfinite_skips,
            "stop_reason": state.stop_reason,
        }
        self.log(summary)
        for logger in self.loggers:
            logger.log_artifact(str(final_path))

    def _checkpoint_path(self, step: int) -> Path:
        return self.path / CHECKPOINTS_DIR / step_dir_name(step)
