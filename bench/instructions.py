"""Instructions per optimizer step of the ``tiny`` job, steadyfit against the hand-written loop, counted by
valgrind's callgrind.

Wall time on a shared machine moves by ±25% minutes apart; the instructions a step executes do not. Each
runner trains the ``tiny`` job of bench/overhead.py twice under callgrind, a short run and a long one; the
difference over the extra steps is the count per step in steady state (imports, set-up and the end of the
run cancel out; logging steps and epoch ends are included). One torch thread and one OpenBLAS thread, so
no idle spinner is counted. Instructions are not time (cache misses and mispredicted branches weigh
nothing here), so the ratio is what the wall-time ratio of bench/overhead.py is read against, not a
replacement for it.

    python bench/instructions.py                          # runs of 100 and 500 steps; ~6 min on 2 cores
    python bench/instructions.py --json instructions.json
    python bench/instructions.py --smoke                  # CI: the counted runs, a few steps, no valgrind
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import overhead  # after the path set-up above

RUNNERS = ("raw", "steadyfit")
COLLECTED = re.compile(r"Collected : (\d+)")


def collected_instructions(valgrind_output: str) -> int:
    """The instruction count callgrind prints when the program ends (``==pid== Collected : N``)."""
    found = COLLECTED.findall(valgrind_output)
    if not found:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{valgrind_output[-2000:]}")
    return int(found[-1])


def count(runner: str, steps: int, under_valgrind: bool) -> int | None:
    """Train the tiny job for ``steps`` optimizer steps in a fresh process; its instruction count, or
    None without valgrind (smoke mode: the run itself is what is checked)."""
    command = [sys.executable, __file__, "--worker", runner, "--steps", str(steps)]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as scratch:
        if under_valgrind:
            out_file = str(Path(scratch) / "callgrind.out")
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", *command]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{runner}, {steps} steps: exit status {proc.returncode}\n{proc.stderr[-2000:]}")
    return collected_instructions(proc.stderr) if under_valgrind else None


def run_worker(runner: str, steps: int) -> None:
    torch.set_num_threads(1)
    job = overhead.make_job("tiny")
    job.max_steps = steps
    overhead.run_one(runner, job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--short", type=int, default=100, help="optimizer steps of the short run")
    parser.add_argument("--long", type=int, default=500, help="optimizer steps of the long run")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="a few steps, without valgrind (CI)")
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.steps)
        return 0
    short, long = (2, 4) if args.smoke else (args.short, args.long)
    if long <= short:
        parser.error("--long must be more steps than --short")
    under_valgrind = not args.smoke
    if under_valgrind and shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt install valgrind); --smoke runs without it")
    runs = [(runner, steps) for runner in RUNNERS for steps in (short, long)]
    # Two at a time: callgrind runs one thread of the program on one core.
    with ThreadPoolExecutor(max_workers=2) as pool:
        by_run = dict(zip(runs, pool.map(lambda run: count(*run, under_valgrind), runs), strict=True))
    per_step: dict[str, float | None] = {}
    for runner in RUNNERS:
        first, last = by_run[(runner, short)], by_run[(runner, long)]
        per_step[runner] = None if first is None or last is None else (last - first) / (long - short)
    raw = per_step["raw"]
    print(f"tiny job, instructions per optimizer step (runs of {short} and {long} steps)\n")
    print("| runner | instructions per step | vs raw |\n|---|---:|---:|")
    for runner, value in per_step.items():
        shown = "–" if value is None else f"{value / 1e6:.3f} M"
        ratio = "–" if value is None or raw is None else f"{value / raw:.3f}×"
        print(f"| {runner} | {shown} | {ratio} |")
    if args.json:
        counts = {runner: {str(n): by_run[(runner, n)] for n in (short, long)} for runner in RUNNERS}
        args.json.write_text(json.dumps({"runs": counts, "per_step": per_step}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
