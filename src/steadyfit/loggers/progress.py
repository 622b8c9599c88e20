"""Progress on the console: a tqdm bar on a terminal, short plain lines otherwise, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from steadyfit import console

# A plain line never wraps on a CI log or a narrow terminal; the whole row is in metrics.jsonl.
LINE_WIDTH = 100
_MORE = " ..."  # ends a line that left numbers out
_NOT_SHOWN = frozenset({"kind", "step", "epoch", "time_s", "first_seen", "message"})


def _number(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _parts(row: dict[str, Any], total_steps: int | None) -> list[str]:
    """What a line says about a row, most important first."""
    parts = [f"step {row.get('step')}" + (f"/{total_steps}" if total_steps else "")]
    if row.get("epoch") is not None:
        parts.append(f"epoch {row['epoch']}")
    kind = row.get("kind")
    if kind == "train":
        shown = {"loss": "loss", "lr": "lr", "samples_per_sec": "samples/s", "tokens_per_sec": "tokens/s"}
        for key, label in shown.items():
            if isinstance(row.get(key), float):
                parts.append(f"{label} {_number(row[key])}")
        return parts
    if kind == "diagnostic":
        return [*parts, str(row.get("diagnostic"))]  # its message is printed once, as a console warning
    # eval (its keys without the eval_ prefix: the tag says it), summary, and rows of any other kind
    for key, value in row.items():
        if key in _NOT_SHOWN or value is None or isinstance(value, bool):
            continue
        text = _number(value) if isinstance(value, float) else str(value)
        parts.append(f"{key.removeprefix('eval_')} {text}")
    return parts


def format_row(row: dict[str, Any], total_steps: int | None, elapsed_s: float) -> str:
    """One line of at most :data:`LINE_WIDTH` characters: the row's kind, time, step (of the total), epoch
    and its main numbers; what does not fit is left out, marked ``...``.

    Example:
        >>> format_row({"kind": "train", "step": 20, "epoch": 0, "loss": 2.2842, "lr": 0.002}, 900, 1.5)
        '[train     1.5s] step 20/900 epoch 0 loss 2.284 lr 0.002'
    """
    line = f"[{row.get('kind', 'info')} {elapsed_s:7.1f}s]"
    parts = _parts(row, total_steps)
    for index, part in enumerate(parts):
        room = LINE_WIDTH - (len(_MORE) if index + 1 < len(parts) else 0)
        if len(line) + 1 + len(part) > room:
            return line + _MORE
        line += " " + part
    return line


class Progress:
    """Shows training progress. ``enabled=False`` silences it (``progress=false``).

    On a terminal: a tqdm bar over optimizer steps with loss, lr and throughput in its postfix, and one line
    per evaluation or finding. Elsewhere (CI, files): one short line (:func:`format_row`) per logged row.
    """

    def __init__(
        self, enabled: bool, total_steps: int | None, initial_step: int = 0, stream: TextIO | None = None
    ):
        self.enabled = enabled
        self.total_steps = total_steps
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
        # The start row has its own console line (see notice), printed whatever ``progress`` says.
        if not self.enabled or row.get("kind") == "start":
            return
        if self._bar is not None and row.get("kind") == "train":
            self._bar.set_postfix(
                {
                    k: f"{row[k]:.4g}"
                    for k in ("loss", "lr", "samples_per_sec")
                    if isinstance(row.get(k), float)
                },
                refresh=False,
            )
            return
        # The row's own time_s when it has one, so the console and metrics.jsonl agree.
        elapsed = row.get("time_s")
        if not isinstance(elapsed, (int, float)):
            elapsed = time.perf_counter() - self._start
        self.message(format_row(row, self.total_steps, elapsed))

    def notice(self, text: str) -> None:
        """A :func:`steadyfit.console.notice`, printed whatever ``enabled`` says, that leaves a live bar
        intact (cleared while the line is written, then redrawn)."""
        if self._bar is None:
            console.notice(text)
            return
        with self._bar.external_write_mode(file=self.stream):
            console.notice(text)

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
