"""CSV logger: one spreadsheet-ready file per row kind, RUN_DIR/metrics_<kind>.csv."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from steadyfit.checkpoint.atomic import replace_file
from steadyfit.layout import CSV_FILE_PATTERN, METRICS_FILE
from steadyfit.loggers.base import Logger
from steadyfit.loggers.registry import row_kind


class CSVLogger(Logger):
    """Write each metrics row to ``RUN_DIR/metrics_<kind>.csv`` (``metrics_train.csv``, ``metrics_eval.csv``).

    One file per kind keeps each file's columns meaningful (train rows and eval rows share almost no
    keys). Columns are the keys in order of first appearance; a row with a new key grows the header by
    rewriting the file (rare: keys settle after the first rows). A resumed run appends to the same files,
    after cutting each back to the rows that metrics.jsonl kept (the rows of its checkpoint), so the steps
    the interrupted run logged after its last checkpoint appear once, as in metrics.jsonl.
    Lists and dicts are written as JSON; a missing key is an empty cell. Every row is flushed, so the files
    can be read while the run is going.

    Example:
        >>> logger = CSVLogger("runs/demo", {})  # doctest: +SKIP
        >>> logger.log_row({"kind": "train", "step": 10, "loss": 0.5})  # doctest: +SKIP
        >>> logger.close()  # doctest: +SKIP
    """

    def __init__(self, run_dir: str, config_dict: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._columns: dict[str, list[str]] = {}
        self._files: dict[str, Any] = {}
        self._keep_the_rows_of_metrics_jsonl()

    def path_for(self, kind: str) -> Path:
        """The CSV file of one row kind."""
        return self.run_dir / CSV_FILE_PATTERN.format(kind=re.sub(r"[^A-Za-z0-9_-]", "_", kind))

    def log_row(self, row: dict[str, Any]) -> None:
        """Append one row to its kind's file, growing the header when the row brings a new key."""
        kind = row_kind(row)
        columns = self._columns.get(kind)
        if columns is None:
            columns = self._open(kind)
        new_keys = [str(key) for key in row if str(key) not in columns and key != "kind"]
        if new_keys:
            columns.extend(new_keys)
            self._rewrite(kind)
        cells = {str(key): _cell(value) for key, value in row.items() if key != "kind"}
        csv.DictWriter(self._files[kind], fieldnames=columns).writerow(cells)
        self._files[kind].flush()

    def close(self) -> None:
        """Close every open file."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _keep_the_rows_of_metrics_jsonl(self) -> None:
        """Cut every existing CSV file back to as many rows of its kind as metrics.jsonl holds.

        The run opens its loggers after cutting metrics.jsonl back to its checkpoint's rows (or to none, for
        a fresh start). Each row of metrics.jsonl became one row of its kind's CSV file, in order, so the
        first rows of each file are the ones to keep. Without a metrics.jsonl (a CSVLogger used on its own)
        the files are left as they are.
        """
        if not (self.run_dir / METRICS_FILE).exists():
            return
        from steadyfit.report import read_metrics  # imported here: report builds on the loggers

        kept_rows = Counter(self.path_for(row_kind(row)) for row in read_metrics(self.run_dir))
        for path in sorted(self.run_dir.glob(CSV_FILE_PATTERN.format(kind="*"))):
            with path.open(newline="", encoding="utf-8") as existing:
                records = list(csv.reader(existing))
            if len(records) <= 1 + kept_rows[path]:
                continue
            kept = io.StringIO(newline="")
            csv.writer(kept).writerows(records[: 1 + kept_rows[path]])  # the header, then the kept rows
            replace_file(path, kept.getvalue().encode("utf-8"))

    def _open(self, kind: str) -> list[str]:
        """Open a kind's file for appending, taking the header of an existing file (a resumed run)."""
        path = self.path_for(kind)
        columns: list[str] = []
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="", encoding="utf-8") as existing:
                columns = next(csv.reader(existing), [])
        self._columns[kind] = columns
        self._files[kind] = path.open("a", newline="", encoding="utf-8")
        return columns

    def _rewrite(self, kind: str) -> None:
        """Rewrite a kind's file with the grown header; written aside and renamed, never half-written."""
        path = self.path_for(kind)
        self._files[kind].close()
        with path.open(newline="", encoding="utf-8") as existing:
            old_rows = list(csv.DictReader(existing)) if path.stat().st_size else []
        rewritten = io.StringIO(newline="")
        writer = csv.DictWriter(rewritten, fieldnames=self._columns[kind])
        writer.writeheader()
        writer.writerows(old_rows)
        replace_file(path, rewritten.getvalue().encode("utf-8"))
        self._files[kind] = path.open("a", newline="", encoding="utf-8")


def _cell(value: Any) -> Any:
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return value
