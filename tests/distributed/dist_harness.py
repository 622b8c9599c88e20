"""Launch dist_script.py under real torchrun agents on 127.0.0.1 (gloo, CPU) and read what the ranks print."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from helpers import interrupt_on_cue

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("dist_script.py")
TIMEOUT_S = 60

KILL = signal.SIGKILL
TERM = signal.SIGTERM


def environment(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        # gloo would otherwise pick the interface the host name resolves to; the tests stay on loopback.
        "GLOO_SOCKET_IFNAME": "lo",
        # A rank blocked on a dead peer gives up well inside the test's timeout.
        "STEADYFIT_COLLECTIVE_TIMEOUT_S": "20",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LOOPBACK_RENDEZVOUS = ("--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0")


def torchrun(
    *target: str,
    nproc: int = 2,
    flags: tuple[str, ...] = (),
    rendezvous: tuple[str, ...] = LOOPBACK_RENDEZVOUS,
) -> list[str]:
    """A torchrun command on loopback: a free rendezvous port, workers' store on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        *rendezvous,
        "--local-addr=127.0.0.1",
        *flags,
        *target,
    ]


def script(*runs: tuple[Path, dict[str, object]]) -> list[str]:
    """dist_script.py and its arguments: one ``(run_dir, overrides)`` per run, run one after another."""
    arguments = [str(SCRIPT)]
    for position, (run_dir, overrides) in enumerate(runs):
        arguments += ["--"] if position else []
        arguments += [str(run_dir), *(f"{key}={value}" for key, value in overrides.items())]
    return arguments


def run_to_end(command: list[str], **extra_env: str) -> str:
    """Run a launch to completion; returns everything it printed."""
    completed = subprocess.run(
        command,
        env=environment(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stdout
    return completed.stdout


def run_until(
    command: list[str],
    is_cue: Callable[[str], bool],
    act: Callable[[dict[int, int]], None],
    **extra_env: str,
) -> str:
    """Start a launch; once a printed line satisfies ``is_cue``, call ``act`` with the worker pids by rank.

    Returns everything the launch printed; the launch's own exit status is not checked (a preempted or
    killed group makes torchrun fail, which is the point of these tests).
    """

    def act_on_pids(process: subprocess.Popen[bytes], seen: list[str]) -> None:
        pids = {
            int(words[1]): int(words[2])
            for words in map(str.split, seen)
            if len(words) == 3 and words[0] == "pid"
        }
        act(pids)

    _, output = interrupt_on_cue(command, environment(**extra_env), is_cue, act_on_pids, TIMEOUT_S, cwd=ROOT)
    return output


def kill_rank_one_after_commit(run_dir: Path, overrides: dict[str, object], step: int) -> str:
    """A 2-rank launch under ``--max-restarts=1`` whose rank 1 is SIGKILLed once the checkpoint of
    ``step`` is committed; torchrun restarts the group, which resumes. Returns everything it printed."""

    def kill_rank_one(pids: dict[int, int]) -> None:
        os.kill(pids[1], KILL)

    output = run_until(
        torchrun(*script((run_dir, overrides)), flags=("--max-restarts=1",)),
        lambda line: line == f"saved {run_dir / 'checkpoints' / f'step-{step:08d}'}",
        kill_rank_one,
        # torch shares the rendezvous store with the workers, and restarted workers can read the previous
        # attempt's gloo addresses from it (pytorch/pytorch#135712); a separate store per attempt avoids it.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    assert "result 0" in output, output
    return output


def preempt_one_rank(
    run_dir: Path, overrides: dict[str, object], rank: int, cue: str, signum: int = TERM
) -> str:
    """A 2-rank launch whose worker of ``rank`` gets ``signum`` (SIGTERM or SIGINT) once the line ``cue``
    is printed; both ranks must end with a checkpoint and exit with that signal's status (143 or 130),
    the rank that got no signal too. Returns everything it printed."""

    def signal_one(pids: dict[int, int]) -> None:
        os.kill(pids[rank], signum)

    if cue.startswith("step "):  # the worker that prints it waits a second for the signal
        _, cue_rank, cue_step = cue.split()
        overrides = {**overrides, "pause_at": f"{cue_rank}:{cue_step}"}
    output = run_until(torchrun(*script((run_dir, overrides))), lambda line: line == cue, signal_one)
    status = str({TERM: 143, signal.SIGINT: 130}[signum])
    assert sorted(printed(output, "exit")) == [["0", status], ["1", status]], output
    return output


def results(output: str) -> dict[int, list[dict]]:
    """The `result RANK {json}` lines of a launch, per rank, in run order."""
    found: dict[int, list[dict]] = {}
    for line in output.splitlines():
        if line.startswith("result "):
            _, rank, payload = line.split(" ", 2)
            found.setdefault(int(rank), []).append(json.loads(payload))
    return found


def printed(output: str, word: str) -> list[list[str]]:
    """The words after ``word`` on each line that starts with it."""
    return [line.split()[1:] for line in output.splitlines() if line.split()[:1] == [word]]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=tolerance, atol=tolerance, msg=f"{key} differs")
