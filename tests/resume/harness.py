"""Run the fault-test training script as a real process and interrupt it on what it prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import interrupt_on_cue

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("train_script.py")
TIMEOUT_S = 120


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(run_dir), *overrides]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_to_end(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        command(run_dir, *overrides), env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert completed.returncode == 0, completed.stderr
    return completed


def run_until(
    run_dir: Path, line: str, sig: int, *overrides: str, release: bool = False, group: bool = False
) -> tuple[int, str]:
    """Start a run, send ``sig`` once it prints ``line``; returns (exit status, everything it printed).

    ``release``: the run holds after ``line`` (``hold=N``) until a line on its stdin, written once the
    signal is sent. ``group``: the run leads a process group of its own, and the signal goes to the whole
    group (its DataLoader workers too), as Slurm's scancel and a terminal's Ctrl-C send it.
    """

    def signal_then_release(process: subprocess.Popen[bytes], _: list[str]) -> None:
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        if release:
            assert process.stdin is not None
            process.stdin.write(b"\n")
            process.stdin.flush()

    return interrupt_on_cue(
        command(run_dir, *overrides),
        environment(),
        lambda printed: printed == line,
        signal_then_release,
        TIMEOUT_S,
        stdin=subprocess.PIPE if release else None,
        new_session=group,
    )


KILL = signal.SIGKILL
TERM = signal.SIGTERM
INT = signal.SIGINT
