"""What the device-side non-finite skip costs inside torch's fused AdamW step, on the ``tiny`` job's model.

steadyfit decides on the device whether a step applies, so the host reads nothing between logging steps:
the fused kernel gets the step's flag as ``found_inf`` and the learning rate as a 0-dim tensor looked up
on the device (``steadyfit.guard.DeviceSkip``). Both cost time inside ``optimizer.step()`` that a
hand-written loop with a float learning rate does not pay. This script times ``optimizer.step()`` of one
optimizer in four settings, interleaved in blocks so a noisy neighbour hurts all alike, and prints the
median and the minimum per step:

    python bench/optimizer_step.py              # 40 rounds of 2,000 steps per setting, one thread
    python bench/optimizer_step.py --json steps.json
    python bench/optimizer_step.py --smoke      # CI: a few steps, no claims
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # after the path set-up above

SETTINGS = {
    "float lr (hand-written loop)": (False, False),
    "float lr + found_inf": (True, False),
    "tensor lr": (False, True),
    "tensor lr + found_inf (steadyfit's device-side skip)": (True, True),
}


def measure(rounds: int, steps: int) -> dict[str, list[float]]:
    """Microseconds per ``optimizer.step()`` of each setting, one sample per round."""
    model = overhead.build_model(overhead.make_job("tiny", smoke=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()  # the state exists before the timing, as after a run's first step
    group = optimizer.param_groups[0]
    found_inf = torch.zeros((), dtype=torch.float32)  # 0: the step applies, as nearly every step does
    tensor_lr = torch.tensor(1e-3, dtype=torch.float64)  # what DeviceSkip gives the CPU kernel
    samples: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(rounds):
        for name, (with_found_inf, with_tensor_lr) in SETTINGS.items():
            if with_found_inf:
                optimizer.found_inf = found_inf  # type: ignore[attr-defined]
            elif hasattr(optimizer, "found_inf"):
                del optimizer.found_inf  # type: ignore[attr-defined]
            group["lr"] = tensor_lr if with_tensor_lr else 1e-3
            started = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            samples[name].append((time.perf_counter() - started) / steps * 1e6)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per setting and round")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="a few steps (CI)")
    args = parser.parse_args(argv)
    rounds, steps = (2, 5) if args.smoke else (args.rounds, args.steps)
    torch.set_num_threads(1)
    samples = measure(rounds, steps)
    base = statistics.median(samples[next(iter(SETTINGS))])
    summary = {
        name: {"median_us": statistics.median(values), "min_us": min(values)}
        for name, values in samples.items()
    }
    print(f"optimizer.step() of the tiny job's model (fused AdamW), {rounds} rounds of {steps} steps\n")
    print("| setting | median µs/step | min µs/step | median − float lr |\n|---|---:|---:|---:|")
    for name, numbers in summary.items():
        extra = numbers["median_us"] - base
        print(f"| {name} | {numbers['median_us']:.1f} | {numbers['min_us']:.1f} | {extra:+.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "steps": steps, "settings": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
