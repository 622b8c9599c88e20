"""Weights & Biases logger: offline unless WANDB_MODE says otherwise, files under RUN_DIR/wandb/."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

from steadyfit.loggers.base import Logger, RunOutcome
from steadyfit.loggers.registry import import_extra, row_step, scalars
from steadyfit.secrets import redact, redact_argument, redact_text, secret_env_values

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "steadyfit"
STEP_METRIC = "global_step"


class WandbLogger(Logger):
    """Log to a W&B run whose files live in ``RUN_DIR/wandb/``.

    Offline by default, so training never needs the network or an account (``wandb sync RUN_DIR/wandb/
    offline-run-*`` uploads later); ``WANDB_MODE=online`` and the other ``WANDB_*`` variables (project,
    entity, API key) are honoured. The project is ``WANDB_PROJECT`` (default ``steadyfit``), the run name
    the run directory's name, metrics the ``<kind>/<key>`` tags of ``scalars`` against ``global_step``, the
    config (secrets masked) the run config, the start row its ``start`` entry. The run id is kept in
    ``RUN_DIR/wandb_run_id`` and a resumed run continues the same W&B run.

    Example:
        >>> logger = WandbLogger("runs/demo", {"lr": 0.1})  # doctest: +SKIP
        >>> logger.log_row({"kind": "train", "step": 10, "loss": 0.5})  # doctest: +SKIP
        >>> logger.close()  # doctest: +SKIP
    """

    def __init__(self, run_dir: str, config_dict: dict[str, Any]) -> None:
        wandb = import_extra("wandb", "wandb")
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._wandb = wandb
        # W&B records the command line (sys.argv) in the run's metadata: it sees a masked copy.
        argv, known = sys.argv, secret_env_values()
        sys.argv = [redact_argument(argument, known) for argument in argv]
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                # Masked like config.yaml's run_dir: a directory may be named after a URL or a token.
                name=redact_text(self.run_dir.name, known),
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                mode=os.environ.get("WANDB_MODE") or "offline",
                config=redact(config_dict, known),
                # Console capture would wrap our stdout (progress bar); what we print is in metrics.jsonl.
                settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE") or "off"),
            )
        finally:
            sys.argv = argv
        # Our step as the x axis, not W&B's own counter, which drops any step logged out of order (a
        # resumed run repeats the steps after its last checkpoint).
        self.run.define_metric(STEP_METRIC, hidden=True)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log_params(self, params: dict[str, Any]) -> None:
        """Update the run config (secrets masked); values may change across a resume."""
        self.run.config.update(redact(params, secret_env_values()), allow_val_change=True)

    def log_row(self, row: dict[str, Any]) -> None:
        """Log every numeric key of the row at the row's step; the start row goes to the run config."""
        if row.get("kind") == "start":
            start = {key: value for key, value in row.items() if key != "kind"}
            self.run.config.update({"start": start}, allow_val_change=True)
            return
        step = row_step(row)
        values = scalars(row)
        if step is not None and values:
            self.run.log({STEP_METRIC: step, **values})

    def log_artifact(self, path: str) -> None:
        """Log a file or directory as a ``model`` artifact named after the run directory."""
        source = Path(path)
        stem = redact_text(f"{self.run_dir.name}-{source.stem}", secret_env_values())
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem)
        artifact = self._wandb.Artifact(name=name, type="model")
        if source.is_dir():
            artifact.add_dir(str(source))
        else:
            artifact.add_file(str(source))
        self.run.log_artifact(artifact)

    def close(self, outcome: RunOutcome = "finished") -> None:
        """Finish the run (flushes the offline files), with exit code 1 unless it finished: W&B shows the
        run failed; a preempted one is marked preempting first."""
        if outcome == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if outcome == "finished" else 1)
