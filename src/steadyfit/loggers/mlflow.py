"""MLflow logger: params, metrics by step and final weights; by default a SQLite store inside the run."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steadyfit.layout import MLFLOW_ARTIFACTS_DIR
from steadyfit.loggers.base import Logger, RunOutcome
from steadyfit.loggers.registry import flatten_params, import_extra, row_step, scalars
from steadyfit.secrets import redact, redact_text, secret_env_values

RUN_ID_FILE = "mlflow_run_id"
DEFAULT_EXPERIMENT = "steadyfit"
RUN_DIR_TAG = "steadyfit.run_dir"

# MLflow's limits: 100 params per batch call, 6000 characters per param value.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_NOT_IN_MLFLOW_NAMES = re.compile(r"[^\w\-./: ]")
# How MLflow names each ending (Lightning's MLFlowLogger uses the same three).
_MLFLOW_STATUS: dict[RunOutcome, str] = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


class MLflowLogger(Logger):
    """Log to MLflow through ``MlflowClient`` (no global active run, so it never clashes with user code).

    The tracking store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///RUN_DIR/mlflow.db`` with
    artifacts under ``RUN_DIR/mlflow-artifacts/``. The experiment is ``MLFLOW_EXPERIMENT_NAME`` (default
    ``steadyfit``); the run is named after the run directory. Metrics use the ``<kind>/<key>`` tags of
    ``scalars`` (``train/loss``, ``eval/accuracy``) at the row's step. The run id is kept in
    ``RUN_DIR/mlflow_run_id``, so a resumed run (a new process on the same run directory) continues the
    same MLflow run. Params are the flattened config with secrets masked. The start row becomes run tags
    ``steadyfit.start.<key>`` (tags, unlike params, may change when a resumed run starts again).

    Example:
        >>> logger = MLflowLogger("runs/demo", {"lr": 0.1})  # doctest: +SKIP
        >>> logger.log_params({"lr": 0.1})  # doctest: +SKIP
        >>> logger.log_row({"kind": "train", "step": 10, "loss": 0.5})  # doctest: +SKIP
        >>> logger.close()  # doctest: +SKIP
    """

    def __init__(self, run_dir: str, config_dict: dict[str, Any]) -> None:
        import_extra("mlflow", "mlflow")
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.run_dir / 'mlflow.db'}"
        with _quiet_mlflow():
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.run_id = self._resume_or_create_run()

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the flattened, redacted config; on a resumed run, only params not logged before.

        MLflow params are immutable: a value that changed across a resume is not logged again; its key is
        listed in the run tag ``steadyfit.changed_params`` instead.
        """
        from mlflow.entities import Param, RunTag

        logged = self.client.get_run(self.run_id).data.params
        new, changed = [], []
        for key, value in flatten_params(redact(params, secret_env_values())).items():
            text = _param_text(value)
            if key not in logged:
                new.append(Param(key, text))
            elif logged[key] != text:
                changed.append(key)
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + _PARAMS_PER_BATCH])
        if changed:
            self.client.log_batch(self.run_id, tags=[RunTag("steadyfit.changed_params", ", ".join(changed))])

    def log_row(self, row: dict[str, Any]) -> None:
        """Log every numeric key of the row as a metric at the row's step (one database write per row)."""
        from mlflow.entities import Metric, RunTag

        if row.get("kind") == "start":
            fields = {key: value for key, value in row.items() if key != "kind"}
            tags = [RunTag(f"steadyfit.start.{key}", _param_text(value)) for key, value in fields.items()]
            self.client.log_batch(self.run_id, tags=tags)
            return
        step = row_step(row)
        if step is None:
            return
        timestamp_ms = int(time.time() * 1000)
        metrics = [
            Metric(_metric_name(tag), value, timestamp_ms, step) for tag, value in scalars(row).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str) -> None:
        """Copy a file or a directory into the run's artifacts, at its path inside the run directory
        (``RUN_DIR/final/model.safetensors`` -> ``final/model.safetensors``), else at the top."""
        source = Path(path).resolve()
        place = source.relative_to(self.run_dir) if source.is_relative_to(self.run_dir) else Path(source.name)
        if source.is_dir():
            self.client.log_artifacts(self.run_id, str(source), artifact_path=place.as_posix())
        else:
            folder = place.parent.as_posix()
            self.client.log_artifact(
                self.run_id, str(source), artifact_path=None if folder == "." else folder
            )

    def close(self, outcome: RunOutcome = "finished") -> None:
        """End the run as FINISHED, FAILED (an exception) or KILLED (preempted); a resumed run sets it
        running again."""
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS[outcome])

    def _resume_or_create_run(self) -> str:
        id_file = self.run_dir / RUN_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip()
            if self._is_live_run(run_id):
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        # Masked like config.yaml's run_dir: a directory may be named after a URL or a token.
        secrets = secret_env_values()
        run = self.client.create_run(
            self._experiment_id(),
            run_name=redact_text(self.run_dir.name, secrets),
            tags={RUN_DIR_TAG: redact_text(str(self.run_dir), secrets)},
        )
        id_file.write_text(run.info.run_id + "\n", encoding="utf-8")
        return run.info.run_id

    def _is_live_run(self, run_id: str) -> bool:
        """Whether the stored run id names a run in this tracking store that was not deleted."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _experiment_id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow's default artifact root is ./mlruns under the working directory; keep the run together.
            artifact_location = (self.run_dir / MLFLOW_ARTIFACTS_DIR).as_uri()
        return self.client.create_experiment(name, artifact_location=artifact_location)


def _metric_name(tag: str) -> str:
    """MLflow refuses names outside letters, digits and ``_ - . / :`` and space; a user's metric may
    be called ``top@5``, which must not stop training."""
    return _NOT_IN_MLFLOW_NAMES.sub("_", tag)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_MAX_PARAM_CHARS]


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Silence what MLflow says while it opens a store: table creation notes and a SQLAlchemy 2.1
    deprecation warning raised inside MLflow's own model definitions (nothing a user can act on)."""
    store_logger = logging.getLogger("mlflow.store.db.utils")
    level = store_logger.level
    store_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*``noload`` loader strategy is deprecated")
            yield
    finally:
        store_logger.setLevel(level)
