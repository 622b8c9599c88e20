"""Progress on the console: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _format(row: dict[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if key in ("kind", "time_s"):
            continue
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class Progress:
    """Shows training progress. ``enabled=False`` silences it (``progress=false``).

    On a terminal: a tqdm bar over optimizer steps with loss, lr and throughput in its postfix. Elsewhere
    (CI, files): one plain line per logging row and per evaluation.
    """

    def __init__(
        self, enabled: bool, total_steps: int | None, initial_step: int = 0, stream: TextIO | None = None
    ):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.is_terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        self._start = time.perf_counter()
        if self.is_terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, file=self.stream
            )

    def step(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            if row.get("kind") == "train":
                self._bar.set_postfix(
                    {
                        k: f"{row[k]:.4g}"
                        for k in ("loss", "lr", "samples_per_sec")
                        if isinstance(row.get(k), float)
                    },
                    refresh=False,
                )
            else:
                self._bar.write(f"[{row.get('kind')}] {_format(row)}", file=self.stream)
            return
        elapsed = time.perf_counter() - self._start
        print(f"[{row.get('kind', 'info')} {elapsed:7.1f}s] {_format(row)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
