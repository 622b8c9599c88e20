"""What it costs to bring one batch from a DataLoader worker to the training process, by its size: torch's
shared memory against the by-value transfer of ``steadyfit.worker_transfer``, both at every size.

Each batch is one float32 tensor, made by cloning (the dataset's work is nothing), so the cost is the
transfer: wall time per batch, the training process's CPU and the two workers' CPU (read from
/proc/<pid>/stat, so Linux only). The limit ``BY_VALUE_MAX_BYTES`` comes from where the two meet.

    python bench/worker_transfer.py                      # 8 KiB to 4 MiB, 2 workers
    python bench/worker_transfer.py --json transfer.json
    python bench/worker_transfer.py --smoke              # CI: two sizes, a few batches, no claims
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steadyfit.worker_transfer import BY_VALUE_MAX_BYTES, _TensorBytes  # after the path set-up above

SIZES = (8 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 4 << 20)


class Copies(Dataset):
    """Every sample is a fresh copy of one tensor of the chosen size."""

    def __init__(self, nbytes: int) -> None:
        self.tensor = torch.randn(nbytes // 4)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensor.clone()


def torch_transfer(samples: list[torch.Tensor]) -> torch.Tensor:
    return samples[0]  # a plain tensor: torch's own shared-memory path


def by_value_transfer(samples: list[torch.Tensor]) -> Any:
    return _TensorBytes(samples[0])  # its bytes pickled, at any size (steadyfit stops at the limit)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(nbytes: int, collate: Any, batches: int) -> dict[str, float]:
    """Microseconds per batch: wall, training-process CPU, workers' CPU."""
    loader = DataLoader(Copies(nbytes), batch_size=1, num_workers=2, collate_fn=collate, prefetch_factor=4)
    iterator = iter(loader)
    for _ in range(20):  # the workers are up and the queues full
        next(iterator)
    workers = [worker.pid for worker in iterator._workers]  # type: ignore[attr-defined]
    wall, cpu = time.perf_counter(), time.process_time()
    worker_cpu = sum(_cpu_seconds(pid) for pid in workers)
    for _ in range(batches):
        batch = next(iterator)
        assert batch.numel() == nbytes // 4
    result = {
        "wall_us": (time.perf_counter() - wall) / batches * 1e6,
        "main_cpu_us": (time.process_time() - cpu) / batches * 1e6,
        "workers_cpu_us": (sum(_cpu_seconds(pid) for pid in workers) - worker_cpu) / batches * 1e6,
    }
    del iterator
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=2000, help="timed batches per size and path")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--smoke", action="store_true", help="two sizes, a few batches (CI)")
    args = parser.parse_args(argv)
    sizes, batches = ((8 << 10, 4 << 20), 10) if args.smoke else (SIZES, args.batches)
    torch.set_num_threads(1)
    rows = []
    print(
        f"one float32 tensor per batch, 2 workers, {batches} batches; µs per batch (by-value limit: "
        f"{BY_VALUE_MAX_BYTES >> 10} KiB)\n"
    )
    print("| size | path | wall | training process CPU | workers CPU |\n|---:|---|---:|---:|---:|")
    for nbytes in sizes:
        for path, collate in (("shared memory", torch_transfer), ("by value", by_value_transfer)):
            numbers = measure(nbytes, collate, batches // 4 if nbytes > BY_VALUE_MAX_BYTES else batches)
            rows.append({"bytes": nbytes, "path": path, **numbers})
            print(
                f"| {nbytes >> 10} KiB | {path} | {numbers['wall_us']:.0f} | {numbers['main_cpu_us']:.0f} | "
                f"{numbers['workers_cpu_us']:.0f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"batches": batches, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
