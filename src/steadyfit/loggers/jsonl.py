"""RUN_DIR/metrics.jsonl: one JSON object a line, always written (rank 0)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from steadyfit.checkpoint.atomic import replace_file
from steadyfit.layout import METRICS_FILE
from steadyfit.loggers.base import Logger


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

    def sync(self) -> None:
        """Make the rows written so far durable (fsync)."""
        if self._file is not None and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


def truncate_rows(run_dir: str | os.PathLike[str], rows: int) -> int:
    """Keep the first ``rows`` complete rows of metrics.jsonl (what a checkpoint recorded), so that a resumed
    run writes every later row exactly once; a torn last line goes too. Returns the rows kept: fewer when
    the file holds fewer (none in a new run directory resuming another run's checkpoint)."""
    return _rewrite(run_dir, lambda position, row: position < rows)


def truncate_history(run_dir: str | os.PathLike[str], after_step: int) -> int:
    """Drop rows logged after ``after_step`` and the summary row, for checkpoints of an older layout that
    recorded no row count. Returns the rows kept."""

    def keep(position: int, row: dict[str, Any]) -> bool:
        step = row.get("step")
        return row.get("kind") != "summary" and not (isinstance(step, int) and step > after_step)

    return _rewrite(run_dir, keep)


def _rewrite(run_dir: str | os.PathLike[str], keep: Callable[[int, dict[str, Any]], bool]) -> int:
    """Rewrite metrics.jsonl (atomically, only when something goes) with the complete rows ``keep`` accepts,
    given their position among the complete rows. Returns the rows kept."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    position = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            dropped += 1
            continue
        if keep(position, row):
            kept.append(line)
        else:
            dropped += 1
        position += 1
    if dropped:
        replace_file(path, "".join(line + "\n" for line in kept).encode("utf-8"))
    return len(kept)
