"""The run directory: lock, config.yaml, metrics and loggers, checkpoints (save, resume), final weights.

Everything fit() writes to disk goes through here, so the loop in trainer.py stays about training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import save_file

from steadyfit.checkpoint import AsyncCheckpointWriter, CheckpointError, CheckpointStore, RunLock
from steadyfit.checkpoint.layout import CHECKPOINTS_DIR, step_dir_name
from steadyfit.config import ConfigError
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

# Changing any of these on resume would silently break exactness (different data order or step content).
RESUME_LOCKED_FIELDS = ("seed", "batch_size", "grad_accum_steps")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def contiguous_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with shared storage broken (safetensors refuses aliased tensors)."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if key is not None and key in seen:
            tensor = tensor.clone()
        elif key is not None:
            seen[key] = name
        state[name] = tensor.contiguous()
    return state


class RunDirectory:
    """One run directory, one writer: the lock, the loggers, the checkpoint store and the final weights."""

    def __init__(self, trainer: Trainer, total_steps: int | None) -> None:
        self.trainer = trainer
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

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RunDirectory:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            self.store.cleanup_stray()
            config_data = redact(self.config.to_yaml_dict())
            atomic_write_bytes(self.path / CONFIG_FILE, yaml.safe_dump(config_data, sort_keys=False).encode())
            self.loggers = [
                JsonlLogger(self.path),
                *build_loggers(self.config.loggers, str(self.path), config_data),
            ]
            for logger in self.loggers:
                logger.log_params(config_data)
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.writer.close()
        finally:
            self.progress.close()
            for logger in self.loggers:
                logger.close()
            self.lock.__exit__(exc_type, exc, tb)

    def log(self, row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_row(row)
        self.progress.log(row)

    # ------------------------------------------------------------------------------------ resume
    def resume_or_start(self) -> None:
        """Restore the newest good checkpoint (``resume=auto``), a named one (PATH), or start fresh."""
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
        self.progress = Progress(self.config.progress, self.total_steps)
        if path is None:
            truncate_history(self.path, 0)
            return
        self._load(path)
        truncate_history(self.path, self.trainer.state.step)
        self.progress.close()
        self.progress = Progress(self.config.progress, self.total_steps, initial_step=self.trainer.state.step)
        self.progress.message(f"steadyfit: resumed from {path} at step {self.trainer.state.step}")

    def _load(self, path: Path) -> None:
        trainer = self.trainer
        model_state, components, extra_files = self.store.load(path)
        saved_config = yaml.safe_load(extra_files.get(CONFIG_FILE, b"{}")) or {}
        for field in RESUME_LOCKED_FIELDS:
            if field in saved_config and saved_config[field] != getattr(self.config, field):
                raise ConfigError(
                    f"{field}: the checkpoint {path} was trained with {field}={saved_config[field]!r}, "
                    f"this run asks for {getattr(self.config, field)!r}; resuming would not be exact. "
                    "Use the same value or a new run_dir (extending max_steps / max_epochs is allowed)"
                )
        state = TrainState.from_dict(components["trainer_state"])
        saved_length = state.extra.get("dataset_length")
        length = _length(trainer.train_data)
        if saved_length is not None and length is not None and saved_length != length:
            raise ConfigError(
                f"train_data: the checkpoint {path} was trained on {saved_length} samples, this run has "
                f"{length}; resuming would not be exact. Use the same data or a new run_dir"
            )
        trainer.model.load_state_dict(model_state)
        trainer.optimizer.load_state_dict(components["optimizer"])
        trainer.scheduler.load_state_dict(components["scheduler"])
        trainer.precision.load_state_dict(components.get("precision", {}))
        restore_rng(components["rng"])
        trainer.state = state
        trainer.window_stats.load_state_dict(state.extra.get("window_stats", {}))
        self.last_checkpoint = str(path)
        self.last_saved_step = state.step

    # ------------------------------------------------------------------------------------ saving
    def save_if_due(self) -> None:
        """The periodic save (every ``save_every`` optimizer steps)."""
        every = self.config.save_every
        step = self.trainer.state.step
        if every and step % every == 0 and self.last_saved_step != step:
            self.save()
        self.fire_committed()

    def save_best(self) -> None:
        """Evaluation improved: this step's checkpoint becomes the best one."""
        state = self.trainer.state
        state.best_checkpoint = str(self._checkpoint_path(state.step))
        self.save(force=True)

    def save(self, force: bool = False) -> None:
        """Snapshot everything to host memory now; write, fsync and commit in the background."""
        trainer, state = self.trainer, self.trainer.state
        if self.last_saved_step == state.step and not force:
            return
        state.extra["dataset_length"] = _length(trainer.train_data)
        state.extra["window_stats"] = trainer.window_stats.state_dict()
        components = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "precision": trainer.precision.state_dict(),
            "trainer_state": state.to_dict(),
            "rng": capture_rng(),
        }
        extra_files = {
            CONFIG_FILE: yaml.safe_dump(redact(self.config.to_yaml_dict()), sort_keys=False).encode()
        }
        protect = [Path(state.best_checkpoint)] if state.best_checkpoint else []
        keep_last = self.config.keep_last

        def committed(path: Path) -> None:
            # Runs in the writer thread, after the commit; user callbacks are fired later, on the main thread.
            self.store.rotate(keep_last, protect=protect)
            self._committed.append(str(path))

        self.writer.submit(
            state.step, contiguous_state(trainer.model), components, extra_files, on_done=committed
        )
        self.last_checkpoint = str(self._checkpoint_path(state.step))
        self.last_saved_step = state.step

    def fire_committed(self) -> None:
        """Tell callbacks about checkpoints the writer has committed since the last call."""
        while self._committed:
            path = self._committed.pop(0)
            self.trainer.callbacks.fire("on_checkpoint_saved", self.trainer, self.trainer.state, path)

    def preempt(self, signum: int) -> None:
        """A signal arrived: checkpoint this step boundary, wait for the commit, and exit 143 / 130."""
        self.save()
        self.writer.wait()
        self.fire_committed()
        self.progress.message(
            f"steadyfit: preempted by signal {signum}; checkpoint {self.last_checkpoint} written"
        )
        raise Preempted(signum, self.last_checkpoint)

    def finish(self) -> None:
        """Final checkpoint, best weights if asked, and RUN_DIR/final/model.safetensors."""
        trainer, state = self.trainer, self.trainer.state
        self.save()
        self.writer.wait()
        self.fire_committed()
        if self.config.load_best_at_end and state.best_checkpoint:
            model_state, _, _ = self.store.load(Path(state.best_checkpoint))
            trainer.model.load_state_dict(model_state)
        final_dir = self.path / FINAL_DIR
        final_dir.mkdir(exist_ok=True)
        final_path = final_dir / FINAL_MODEL_FILE
        tmp = final_dir / f".{FINAL_MODEL_FILE}.tmp"
        save_file(contiguous_state(trainer.model), str(tmp), metadata={"step": str(state.step)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final_path)
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


def _length(data: Any) -> int | None:
    from steadyfit.data import dataset_length

    return dataset_length(data)


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved config a run wrote first."""
    return yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8")) or {}
