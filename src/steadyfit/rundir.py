"""The run directory's files: the lock, config.yaml, metrics.jsonl and the other loggers, the final weights.

It knows files, never the training loop: the Trainer decides what is logged and when, what is final and what
a resume restores. Under several ranks rank 0 alone writes; on the other ranks the writing methods do
nothing, so every rank can call them at the same points.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steadyfit.checkpoint import CheckpointError, CheckpointStore, RunLock, RunLockedError
from steadyfit.checkpoint.atomic import replace_file, replace_with
from steadyfit.checkpoint.payload import prepare_tensors
from steadyfit.checkpoint.tensor_file import write_tensor_file
from steadyfit.config import ConfigError
from steadyfit.console import warn
from steadyfit.hf import pretrained_config_files
from steadyfit.layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    FINAL_DIR,
    FINAL_EMA_FILE,
    FINAL_MODEL_FILE,
    METRICS_FILE,
)
from steadyfit.loggers.base import LoggerError, LoggerProtocol, RunOutcome, close_logger
from steadyfit.loggers.jsonl import JsonlLogger, truncate_history, truncate_rows
from steadyfit.loggers.registry import build_loggers
from steadyfit.signals import Preempted

if TYPE_CHECKING:
    from steadyfit.distributed import Distributed


def write_weights(path: Path, tensors: dict[str, torch.Tensor], step: int) -> None:
    """Write a safetensors file atomically (temporary name, fsync, rename).

    Its metadata holds the step and ``format: pt``, which ``transformers`` before 5 requires of a file
    ``from_pretrained`` loads. Written straight from the tensors' memory, the same bytes for the same
    weights.
    """
    metadata = {"format": "pt", "step": str(step)}
    replace_with(path, lambda tmp: write_tensor_file(tmp, tensors, metadata))


class RunDirectory:
    """One run directory, one writer.

    Entering it (rank 0) takes the lock and removes what a crashed save left in ``checkpoints/``;
    :meth:`open_loggers` then writes ``config.yaml`` and opens the loggers; leaving it closes the loggers
    and releases the lock. As a
    checkpoint component it saves how many rows metrics.jsonl holds; after a resume :meth:`cut_back` cuts
    the file back to them, so a resumed run writes every row exactly once.

    Args:
        path: the run directory.
        dist: the process group; rank 0 writes.
        config_yaml: the resolved config (secrets removed), as written to config.yaml.
        config_dict: the same as plain data, for the loggers' parameters.
        logger_specs: ``TrainConfig.loggers``, names and logger objects (metrics.jsonl is always written).

    Example:
        >>> import tempfile
        >>> from steadyfit.config import TrainConfig
        >>> from steadyfit.distributed import Distributed
        >>> one_process = Distributed.setup(TrainConfig())
        >>> with RunDirectory(tempfile.mkdtemp(), one_process, b"seed: 0\\n", {}, []) as run:
        ...     run.open_loggers()
        ...     run.log({"kind": "train", "step": 1, "loss": 0.5})
        >>> run.rows
        1
    """

    def __init__(
        self,
        path: str | Path,
        dist: Distributed,
        config_yaml: bytes,
        config_dict: dict[str, Any],
        logger_specs: list[str | LoggerProtocol],
    ) -> None:
        self.path = Path(path)
        self.dist = dist
        self.config_yaml = config_yaml
        self.config_dict = config_dict
        self.logger_specs = logger_specs
        self.lock = RunLock(self.path)
        self.loggers: list[LoggerProtocol] = []
        self.rows = 0
        self._restored: dict[str, int] | None = None
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> RunDirectory:
        self._on_main(self._open)
        return self

    def _on_main(self, action: Any) -> None:
        # Rank 0 alone writes to the run directory; the others learn whether it could.
        error: BaseException | None = None
        if self.dist.is_main:
            try:
                action()
            except (ConfigError, CheckpointError, RunLockedError, LoggerError) as exc:
                error = exc
            except OSError as exc:  # metrics.jsonl or config.yaml is a directory, a full disk, ...
                error = ConfigError(
                    f"run_dir: cannot write {exc.filename or self.path} ({exc.strerror or exc}); move what "
                    "is in the way, free space, or choose another run_dir"
                )
        error = self.dist.broadcast_object(error)
        if error is not None:
            raise error

    def _open(self) -> None:
        acquire_run_lock(self.lock)
        try:
            # Checked before training too, not only at its end: the whole run would be lost to a refusal.
            final_dir = self.path / FINAL_DIR
            if _is_link_or_file(final_dir):
                raise ConfigError(
                    f"run_dir: {final_dir} is a link or a file, not a directory; move it away and rerun "
                    "(the final weights are written inside the run directory only)"
                )
            for name, must_be_dir in ((CHECKPOINTS_DIR, True), (CONFIG_FILE, False), (METRICS_FILE, False)):
                path = self.path / name
                if path.exists() and path.is_dir() != must_be_dir:
                    what = "a file" if must_be_dir else "a directory"
                    raise ConfigError(f"run_dir: {path} is {what}, which steadyfit cannot use; move it away")
            CheckpointStore(self.path).cleanup_stray()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise

    def open_loggers(self) -> None:
        """Write config.yaml and open the loggers: once a resume decided that this run owns the directory
        (a refused experiment leaves the directory's config and logger stores as they were)."""
        self._on_main(self._open_loggers)

    def _open_loggers(self) -> None:
        replace_file(self.path / CONFIG_FILE, self.config_yaml)
        self.loggers = [
            JsonlLogger(self.path),
            *build_loggers(self.logger_specs, str(self.path), self.config_dict),
        ]
        for logger in self.loggers:
            try:
                logger.log_params(self.config_dict)
            except (ConfigError, LoggerError):
                raise
            except Exception as exc:
                # A user's logger object: as a LoggerError it reaches every rank (none waits forever).
                raise LoggerError(f"logger {type(logger).__name__}: log_params raised {exc!r}") from exc

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.dist.is_main:
            return
        failures = []
        outcome = _outcome(exc_type)
        try:
            for logger in self.loggers:  # every logger gets its close, whatever another one raised
                try:
                    close_logger(logger, outcome)
                except Exception as error:
                    failures.append(error)
        finally:
            self.lock.__exit__(exc_type, exc, tb)
        if failures and exc_type is None:
            raise LoggerError(f"closing a logger failed: {failures[0]!r}") from failures[0]
        for failure in failures:  # the run's own error is the news; these only add to it
            warn(f"closing a logger failed too: {failure!r}")

    # ------------------------------------------------------------------------------------ metrics
    def log(self, row: dict[str, Any]) -> None:
        """Write one row to metrics.jsonl and every logger (``time_s`` added when missing)."""
        row.setdefault("time_s", round(time.perf_counter() - self.started, 3))
        self.rows += 1
        for logger in self.loggers:
            logger.log_row(row)

    def add_logger(self, logger: LoggerProtocol) -> None:
        """A logger of the caller's that receives every later row, on the rank that adds it."""
        self.loggers.append(logger)

    def start_fresh(self) -> None:
        """No checkpoint to resume: rows a run wrote before it died without one are dropped."""
        if self.dist.is_main:
            truncate_rows(self.path, 0)
        self.rows = 0

    def state_dict(self) -> dict[str, int]:
        """How many rows metrics.jsonl holds; they are made durable first, like the checkpoint itself."""
        for logger in self.loggers:
            if isinstance(logger, JsonlLogger):
                logger.sync()  # one fsync per checkpoint
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the row count of a checkpoint; :meth:`cut_back` applies it once the whole restore worked.

        A checkpoint of an older layout names its step instead (``after_step``): rows of later steps go.
        """
        rows, after_step = state.get("rows"), state.get("after_step")
        if rows is None and isinstance(after_step, int) and not isinstance(after_step, bool):
            self._restored = {"after_step": after_step}
            return
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"metrics: 'rows' must be a count, got {rows!r}")
        self._restored = {"rows": rows}

    def cut_back(self) -> None:
        """Cut metrics.jsonl back to the restored checkpoint's rows (rank 0), so a resumed run writes every
        row exactly once. Called after every rank restored every component: a restore that fails on any
        rank leaves the file as it was."""
        restored, self._restored = self._restored, None
        if restored is None:
            return
        kept = None
        if self.dist.is_main:
            if "after_step" in restored:
                kept = truncate_history(self.path, restored["after_step"])
            else:
                kept = truncate_rows(self.path, restored["rows"])
        # Every rank counts the same rows: the count decides, alike everywhere, whether to save again.
        self.rows = self.dist.broadcast_object(kept)

    def last_eval_scores(self) -> dict[str, float]:
        """The scores of the last eval row of metrics.jsonl (cut back to a checkpoint's rows), on every rank:
        what a resumed run, a rerun of a finished one included, reports until it evaluates again."""
        scores: dict[str, float] = {}
        # No metrics.jsonl: a new run directory resuming another run's checkpoint (resume=PATH).
        if self.dist.is_main and (self.path / METRICS_FILE).exists():
            from steadyfit.report import read_metrics  # imported here: report builds on the loggers

            last = next((row for row in reversed(read_metrics(self.path)) if row.get("kind") == "eval"), {})
            # JSON has no NaN: metrics.jsonl holds a non-finite score as null.
            scores = {
                key: float("nan") if value is None else value
                for key, value in last.items()
                if key.startswith(("eval_", "ema_eval_"))
                and (value is None or isinstance(value, (int, float)))
            }
        return self.dist.broadcast_object(scores)

    # ------------------------------------------------------------------------------------ final weights
    def write_final(
        self,
        weights: dict[str, torch.Tensor],
        step: int,
        *,
        hf_model: Any = None,
        ema_weights: dict[str, torch.Tensor] | None = None,
    ) -> Path | None:
        """Write ``final/model.safetensors`` (and ``ema.safetensors``); returns its path (None off rank 0).

        ``hf_model``: a Hugging Face model, whose config files are written next to the weights so that
        ``from_pretrained(RUN_DIR/final)`` loads them; an object that only has ``save_pretrained`` and a
        ``config`` (a PEFT model) saves its own files there.
        """
        if not self.dist.is_main:
            return None
        final_dir = self.path / FINAL_DIR
        if _is_link_or_file(final_dir):
            raise CheckpointError(
                f"{final_dir} is not a directory (a link or a file): move it away; the weights are in the "
                "last checkpoint"
            )
        final_dir.mkdir(exist_ok=True)
        final_path = final_dir / FINAL_MODEL_FILE
        write_weights(final_path, prepare_tensors(weights), step=step)
        if hf_model is not None:
            config_files = pretrained_config_files(hf_model)
            if config_files is None:
                hf_model.save_pretrained(str(final_dir), state_dict=weights, safe_serialization=True)
            else:
                for name, text in config_files.items():
                    replace_file(final_dir / name, text.encode())
        if ema_weights is not None:
            write_weights(final_dir / FINAL_EMA_FILE, prepare_tensors(ema_weights), step=step)
        for logger in self.loggers:
            logger.log_artifact(str(final_path))
        return final_path


def _is_link_or_file(path: Path) -> bool:
    return path.is_symlink() or (path.exists() and not path.is_dir())


def acquire_run_lock(lock: RunLock) -> None:
    """Create the run directory if needed and take its lock, or say in one line why it cannot be one.

    Raises:
        ConfigError: ``run_dir`` is a file, cannot be created or written, or its lock file is a link.
        RunLockedError: another run holds the lock.
    """
    run_dir = lock.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory; choose another run_dir")
    try:
        lock.acquire()
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the lock is opened with O_NOFOLLOW: a link is never followed
            raise ConfigError(
                f"run_dir: the lock file {lock.path} is a symbolic link, not steadyfit's; remove it and rerun"
            ) from None
        raise ConfigError(
            f"run_dir: cannot use {run_dir} as a run directory ({exc.strerror}: {exc.filename}); "
            "choose a directory you can create and write"
        ) from None


def _outcome(exc_type: type[BaseException] | None) -> RunOutcome:
    """How the run ended, from the exception leaving it (None: it finished)."""
    if exc_type is None:
        return "finished"
    if issubclass(exc_type, Preempted | KeyboardInterrupt):
        return "preempted"
    return "failed"
