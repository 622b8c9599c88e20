"""What one optimizer step of steadyfit dispatches beyond the hand-written loop, counted by torch's profiler.

Timings on a shared machine move by ±10%; operator counts do not. This script trains the ``tiny`` job of
bench/overhead.py with the raw loop and with steadyfit, profiles the same window of steady-state steps in
each, and prints per step: top-level operators (what Python dispatched), every profiler event (operators
with the ones they call), and the operators whose count differs between the two.

    python bench/ops.py                  # steps 200-300 of the tiny job, one thread
    python bench/ops.py --json ops.json  # the same numbers as JSON
    python bench/ops.py --smoke          # CI: a short window, no claims
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import overhead  # after the path set-up above


class StepWindowProfiler:
    """Profiles optimizer steps ``first`` to ``last`` (counted by torch's global optimizer post-hook), so
    set-up, the first step and the end of the run stay out for every runner alike."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.count = 0
        self.profiler: profile | None = None
        self._handle = register_optimizer_step_post_hook(self._on_step)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.count += 1
        if self.count == self.first:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        elif self.count == self.last and self.profiler is not None:
            self.profiler.__exit__(None, None, None)

    def counts(self) -> tuple[collections.Counter[str], collections.Counter[str]]:
        """(top-level operators, every event) by name over the window; stops counting steps."""
        self._handle.remove()
        if self.profiler is None or self.count < self.last:
            raise RuntimeError(f"the run made {self.count} steps; the window needs {self.last}")
        events = self.profiler.events()
        every = collections.Counter(event.name for event in events)
        top = collections.Counter(event.name for event in events if event.cpu_parent is None)
        return top, every


def count_ops(
    runner: str, first: int, last: int
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    job = overhead.make_job("tiny")
    job.max_steps = last + 10
    window = StepWindowProfiler(first, last)
    if runner == "raw":
        overhead.run_raw(job, use_dataloader=False)
    else:
        overhead.run_steadyfit(job)
    return window.counts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--first", type=int, default=200, help="first profiled optimizer step")
    parser.add_argument("--steps", type=int, default=100, help="profiled steps")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="a short window (CI)")
    args = parser.parse_args(argv)
    first, steps = (5, 5) if args.smoke else (args.first, args.steps)
    torch.set_num_threads(1)
    (raw_top, raw_all), (sf_top, sf_all) = (count_ops(r, first, first + steps) for r in ("raw", "steadyfit"))
    per_step = {
        "raw": {"top_level": sum(raw_top.values()) / steps, "events": sum(raw_all.values()) / steps},
        "steadyfit": {"top_level": sum(sf_top.values()) / steps, "events": sum(sf_all.values()) / steps},
    }
    names = sorted(set(raw_top) | set(sf_top), key=lambda name: (raw_top[name] - sf_top[name], name))
    difference = {
        name: (sf_top[name] - raw_top[name]) / steps for name in names if sf_top[name] != raw_top[name]
    }
    print(f"tiny job, optimizer steps {first}-{first + steps}, per step\n")
    print("| runner | top-level operators | profiler events |\n|---|---:|---:|")
    for runner, numbers in per_step.items():
        print(f"| {runner} | {numbers['top_level']:.2f} | {numbers['events']:.2f} |")
    print("\n| top-level operator | steadyfit − raw |\n|---|---:|")
    for name, delta in difference.items():
        print(f"| `{name}` | {delta:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"per_step": per_step, "top_level_difference": difference}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
