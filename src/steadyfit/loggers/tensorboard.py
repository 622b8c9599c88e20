"""TensorBoard logger: event files under RUN_DIR/tensorboard/, one scalar per numeric key of every row."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steadyfit.layout import TENSORBOARD_DIR
from steadyfit.loggers.base import Logger
from steadyfit.loggers.registry import flatten_params, import_extra, row_step, scalars
from steadyfit.secrets import redact, secret_env_values

# Metrics the HParams dashboard shows next to each run's hyperparameters.
_HPARAM_METRICS = ("train/loss", "eval/loss")


class TensorBoardLogger(Logger):
    """Write ``RUN_DIR/tensorboard/events.out.tfevents.*`` with ``torch.utils.tensorboard.SummaryWriter``.

    Tags are ``<kind>/<key>`` without the kind prefix of the key (``train/loss``, ``train/lr``,
    ``eval/loss``, ``eval/accuracy``), at the row's step. Diagnostic rows also become text
    (``diagnostic/<name>``), the start row a table in the text tab (``start``, no scalars). The config goes
    to the HParams dashboard and, as a table, to the text tab.

    A resumed run (event files already there) purges the steps it is about to repeat: TensorBoard hides
    the events of the interrupted attempt after the checkpoint's step (the step of the resumed run's start
    row; without one, from the first step the new process logs).

    Example:
        >>> logger = TensorBoardLogger("runs/demo", {})  # doctest: +SKIP
        >>> logger.log_row({"kind": "train", "step": 10, "loss": 0.5})  # doctest: +SKIP
        >>> logger.close()  # then: tensorboard --logdir runs/demo/tensorboard  # doctest: +SKIP
    """

    def __init__(self, run_dir: str, config_dict: dict[str, Any]) -> None:
        self._tensorboard = import_extra("torch.utils.tensorboard", "tensorboard")
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self._resumed = self.log_dir.is_dir() and any(self.log_dir.glob("events.out.tfevents.*"))
        self._writer: Any = None
        self._pending_params: dict[str, Any] | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Record the config (secrets masked) as hyperparameters and as a text table."""
        params = redact(params, secret_env_values())
        if self._writer is None:
            # The writer waits for the first row: its step is where a resumed run purges from.
            self._pending_params = params
        else:
            self._write_params(params)

    def log_row(self, row: dict[str, Any]) -> None:
        """Add each numeric key of the row as a scalar at the row's step (rows without a step are skipped)."""
        step = row_step(row)
        if step is None:
            return
        if row.get("kind") == "start":
            # A resumed run starts at its checkpoint's step, whose rows the checkpoint holds: only the steps
            # after it are repeated, so only they are purged.
            writer = self._open(purge_step=step + 1)
            writer.add_text("start", _markdown_table(row.items()), global_step=step)
            return
        writer = self._open(purge_step=step)
        for tag, value in scalars(row).items():
            writer.add_scalar(tag, value, global_step=step)
        if row.get("kind") == "diagnostic":
            name = str(row.get("diagnostic", "message"))
            writer.add_text(f"diagnostic/{name}", str(row.get("message", "")), global_step=step)

    def close(self) -> None:
        """Flush the event file and close it."""
        if self._writer is None and self._pending_params is not None:
            self._open(purge_step=None)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self, purge_step: int | None) -> Any:
        if self._writer is None:
            self._writer = self._tensorboard.SummaryWriter(
                log_dir=str(self.log_dir), purge_step=purge_step if self._resumed else None
            )
            if self._pending_params is not None:
                self._write_params(self._pending_params)
                self._pending_params = None
        return self._writer

    def _write_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_params(params)
        values = {
            key: v if isinstance(v, int | float | str | bool) else json.dumps(v) for key, v in flat.items()
        }
        for summary in hparams(values, dict.fromkeys(_HPARAM_METRICS, 0.0)):
            self._writer.file_writer.add_summary(summary)
        self._writer.add_text("config", _markdown_table(flat.items()), global_step=0)


def _markdown_table(items: Iterable[tuple[str, Any]]) -> str:
    """``| field | value |`` rows, values as JSON: how TensorBoard's text tab shows a mapping."""
    lines = (f"| {key} | {json.dumps(value)} |" for key, value in items)
    return "| field | value |\n|---|---|\n" + "\n".join(lines)
