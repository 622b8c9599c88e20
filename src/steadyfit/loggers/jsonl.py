"""RUN_DIR/metrics.jsonl: one JSON object a line, always written (rank 0)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

from steadyfit.checkpoint.atomic import replace_file
from steadyfit.loggers.base import Logger

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    # JSON has no NaN/inf; write them as null so every line stays standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger(Logger):
    """Appends rows to metrics.jsonl, one flushed line each, so a crash loses at most the line in flight.

    Example:
        >>> import tempfile
        >>> logger = JsonlLogger(tempfile.mkdtemp())
        >>> logger.log_row({"kind": "train", "step": 1, "loss": 0.5}); logger.close()
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        # Opened on the first row: a resume may first rewrite the file (truncate_history).
        self._file: IO[str] | None = None

    def log_row(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps({key: _plain(value) for key, value in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


def truncate_history(run_dir: str | os.PathLike[str], after_step: int) -> int:
    """Drop rows logged after ``after_step`` (by a run that died after its last checkpoint), so that a
    resumed run writes each step exactly once. A torn last line is dropped too. Returns rows dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if not isinstance(row, dict):
            dropped += 1
            continue
        step = row.get("step")
        # The summary row is rewritten when the run finishes; rows past the checkpoint will be logged again.
        if row.get("kind") == "summary" or (isinstance(step, int) and step > after_step):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        replace_file(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    return dropped


def read_rows(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete row of metrics.jsonl (a torn last line of a run in progress is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
