"""RunLock: one process per run directory, released on exit and when the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import steadyfit.checkpoint
from steadyfit.checkpoint import RunLock, RunLockedError

SRC_DIR = Path(steadyfit.checkpoint.__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC_DIR)},
        capture_output=True,
        text=True,
        check=False,
    )


def acquire_in_child(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_python(
        "import sys\n"
        "from steadyfit.checkpoint.lock import RunLock, RunLockedError\n"
        "try:\n"
        f"    RunLock({str(run_dir)!r}).acquire()\n"
        "except RunLockedError as exc:\n"
        "    sys.exit(str(exc))\n"
    )


def test_a_second_process_is_refused_with_the_lock_file_named(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLock(run_dir) as lock:
        result = acquire_in_child(run_dir)
        assert result.returncode == 1
        assert f"lock file {run_dir / '.lock'} is held by pid {os.getpid()}" in result.stderr
        assert f"another run is using the directory {run_dir}" in result.stderr
        assert lock.is_held


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=str(tmp_path / ".lock")):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path) as again:
        assert again.is_held
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()}\n")


def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    killed = run_python(
        "import os, signal\n"
        "from steadyfit.checkpoint.lock import RunLock\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert killed.returncode == -9
    with RunLock(tmp_path) as lock:
        assert lock.is_held
