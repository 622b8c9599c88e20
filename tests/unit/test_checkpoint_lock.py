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


def test_a_forked_child_does_not_keep_the_lock_of_its_dead_parent(tmp_path: Path) -> None:
    # A DataLoader worker is a fork of the run: orphaned by a SIGKILL, it lives on for seconds. It must not
    # hold the run's lock meanwhile, or the rerun is refused; while the parent lives, the lock stays held.
    code = (
        "import os, signal, sys, time\n"
        "from steadyfit.checkpoint.lock import RunLock, RunLockedError\n"
        f"RunLock({str(tmp_path)!r}).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    devnull = os.open(os.devnull, os.O_RDWR)\n"
        "    os.dup2(devnull, 1), os.dup2(devnull, 2)  # the test reads the parent's output to its end\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
        "try:\n"
        f"    RunLock({str(tmp_path)!r}).acquire()\n"
        "    sys.exit('a second lock was granted while the parent held it')\n"
        "except RunLockedError:\n"
        "    pass\n"
        "print(child, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = run_python(code)
    assert killed.returncode == -9, killed.stderr
    orphan = int(killed.stdout)
    try:
        os.kill(orphan, 0)  # still alive
        with RunLock(tmp_path) as lock:
            assert lock.is_held
    finally:
        os.kill(orphan, 9)
