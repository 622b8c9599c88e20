"""Save and load time of steadyfit's checkpoint store against plain ``torch.save`` / ``torch.load``.

The state is a ~100 MB fp32 MLP plus its AdamW state after one step (~300 MB in all), the shape of what
the Trainer saves. After a discarded warm-up round, each repetition runs every variant once, in a fixed
interleaved order, with ``os.sync()`` before each (the async save's two ways alternate between
repetitions, and its training steps move the state on); the table reports medians (min–max):

- ``torch.save``: one pickle file, no fsync (the data may still sit in the page cache when it returns).
- ``torch.save + fsync``: the same file fsynced, and its directory: the durable, fair comparison.
- ``steadyfit save``: ``CheckpointStore.save``: safetensors + JSON into a temporary directory, XXH3
  manifest (hashed from memory while writing), fsync of every file and directory, atomic rename.
- ``steadyfit async, blocked``: how long an ``AsyncCheckpointWriter`` save blocks the training loop, as the
  Trainer saves: ``submit`` (the copy of the weights to host memory), then the next step's forward and
  backward (a batch of 64) while the writer thread copies the optimizer state, then ``wait_staged`` (what
  is left of that copy) before the optimizer step; at every save after a run's first, which refills the
  host buffers of the save before; ``(first save)``: the first, which allocates them; ``(everything at
  submit)``: ``submit`` copying the optimizer state too, as before the writer thread copied it, timed in
  every other repetition instead (so each repetition writes two async saves, as in earlier sittings);
  ``steadyfit async, total``: the later submit until its commit (the training step it overlaps included).
- ``training step, no save`` and ``training step, save in flight``: that forward and backward alone, and
  from the ``submit`` before it to the ``wait_staged`` after it: their difference is what a save costs
  the loop, the writer thread's competition for cores and memory bandwidth included; ``(everything at
  submit)``: the same with the optimizer state copied at submit.
- ``torch.load`` (``weights_only=True``) and ``steadyfit load`` (manifest verified, then parsed), both
  reading files that are still in the page cache from the save just before, in this process: into memory
  the allocator may hand back from the repetition before.
- ``..., fresh process``: the same two loads, each in a new process (its imports not timed), as a resume
  loads: every tensor's memory comes fresh from the kernel.

``--handoff`` measures instead where leaving the optimizer state's copy to the writer thread starts to pay
(``DeferredCopies.MIN_BYTES``): for two-layer MLPs of growing width, with their AdamW state after one step,
the median of 15 saves each way, alternating, of how long a save blocks the loop (``blocked_s``, after a
forward and backward of a batch of 64): the state copied at submit against left to the writer thread (the
threshold set to 0 for the measurement).

Usage::

    python bench/checkpoint.py                     # 4 repetitions, markdown table
    python bench/checkpoint.py --reps 6 --json checkpoint.json
    python bench/checkpoint.py --smoke             # a ~14 MB state, 2 repetitions (CI; no timing claims)
    python bench/checkpoint.py --handoff           # the blocked time by state size, deferred or not
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SRC_DIR = Path(__file__).resolve().parent.parent / "src"
if str(SRC_DIR) not in sys.path:
    sys.path.insert(0, str(SRC_DIR))  # run from a checkout without installing steadyfit

from steadyfit.checkpoint import AsyncCheckpointWriter, CheckpointStore  # noqa: E402
from steadyfit.checkpoint.staging import DeferredCopies  # noqa: E402

# Targets from the checkpoint issue: the fsync is the honest cost of a durable save.
SYNC_SAVE_TARGET = 1.0
VERIFIED_LOAD_TARGET = 2.0
ASYNC_BLOCKING_TARGET = 0.10


def build_state(hidden: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP of ``layers`` square ``hidden`` layers and its AdamW after one step (moments allocated)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, hidden)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    # Flush everything dirty first: a previous unsynced write must not be paid for by the next variant.
    os.sync()
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def load_in_fresh_process(kind: str, path: Path) -> float:
    """Seconds one load of ``path`` takes in a new process (``kind``: "torch" or "steadyfit"), timed there
    around the load alone, after its imports."""
    os.sync()
    command = [sys.executable, __file__, "--time-load", kind, str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} load of {path} in a fresh process failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def time_load(kind: str, path: Path) -> float:
    start = time.perf_counter()
    if kind == "torch":
        torch.load(path, weights_only=True)
    else:
        CheckpointStore(path.parent.parent).load(path)
    return time.perf_counter() - start


def one_repetition(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, workdir: Path, rep: int
) -> dict[str, float]:
    """Every variant once; files are deleted as soon as they are measured, so the disk never fills."""
    times: dict[str, float] = {}
    torch_state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    components = {"optimizer": optimizer.state_dict(), "trainer": {"step": rep, "epoch": 0}}

    plain = workdir / f"plain-{rep}.pt"
    times["torch.save"], _ = timed(lambda: torch.save(torch_state, plain))
    plain.unlink()

    durable = workdir / f"durable-{rep}.pt"

    def save_and_fsync() -> None:
        torch.save(torch_state, durable)
        fsync(durable)
        fsync(workdir)

    times["torch.save + fsync"], _ = timed(save_and_fsync)
    times["torch.load"], _ = timed(lambda: torch.load(durable, weights_only=True))

    store = CheckpointStore(workdir / f"run-{rep}")
    times["steadyfit save"], path = timed(lambda: store.save(1, model.state_dict(), components))
    times["steadyfit load"], _ = timed(lambda: store.load(path))

    async_store = CheckpointStore(workdir / f"async-{rep}")
    # What the Trainer leaves to the writer thread: every tensor of the optimizer's state.
    moments = [value for state in optimizer.state.values() for value in state.values()]
    batch = torch.randn(64, model[0].in_features)

    def forward_backward() -> None:
        model(batch).square().mean().backward()

    times["training step, no save"], _ = timed(forward_backward)
    optimizer.zero_grad()
    os.sync()
    # Every other repetition copies the optimizer state at submit in its second save, as before the writer
    # thread copied it: two saves a repetition, as many bytes written as in earlier sittings (a third save
    # slowed the next repetition's sync save on this VM's disk).
    deferred = rep % 2 == 0
    variant = "" if deferred else " (everything at submit)"
    with AsyncCheckpointWriter(async_store) as writer:
        # A run's first save allocates the host copies; every later one refills them.
        for step in (1, 2):
            start = time.perf_counter()
            writer.submit(step, model.state_dict(), components, copy_later=moments if deferred else ())
            forward_backward()  # the next step's, while the writer thread copies the optimizer state
            writer.wait_staged()
            if step == 2:
                times[f"training step, save in flight{variant}"] = time.perf_counter() - start
                times[f"steadyfit async, blocked{variant}"] = writer.blocked_s
            elif deferred:
                times["steadyfit async, blocked (first save)"] = writer.blocked_s
            optimizer.step()
            optimizer.zero_grad()
            writer.wait()
        if deferred:
            times["steadyfit async, total"] = time.perf_counter() - start
    shutil.rmtree(async_store.run_dir)
    # Last, so that no process's exit (and the release of its memory) falls inside another variant.
    times["torch.load, fresh process"] = load_in_fresh_process("torch", durable)
    times["steadyfit load, fresh process"] = load_in_fresh_process("steadyfit", path)
    durable.unlink()
    shutil.rmtree(store.run_dir)
    return times


def summarise(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    summary = {
        name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
        for name, values in samples.items()
    }
    save, fair, sync = (
        summary[n]["median_s"] for n in ("torch.save", "torch.save + fsync", "steadyfit save")
    )
    summary["steadyfit save"]["vs_torch_save"] = sync / save
    summary["steadyfit save"]["vs_torch_save_fsync"] = sync / fair
    summary["steadyfit load"]["vs_torch_load"] = (
        summary["steadyfit load"]["median_s"] / summary["torch.load"]["median_s"]
    )
    fresh = summary["steadyfit load, fresh process"]
    fresh["vs_torch_load_fresh"] = fresh["median_s"] / summary["torch.load, fresh process"]["median_s"]
    for name in ("steadyfit async, blocked", "steadyfit async, blocked (everything at submit)"):
        summary[name]["vs_sync_save"] = summary[name]["median_s"] / sync
    for name in ("training step, save in flight", "training step, save in flight (everything at submit)"):
        summary[name]["step_cost_vs_sync_save"] = (
            summary[name]["median_s"] - summary["training step, no save"]["median_s"]
        ) / sync
    return summary


def markdown_table(summary: dict[str, dict[str, float]], size_bytes: int, reps: int) -> str:
    lines = [
        f"State: {size_bytes / 1e6:.0f} MB (model + AdamW moments), {reps} repetition(s), medians (the "
        "async rows: of every other one).",
        "",
        "| operation | median s | min–max s | ratio |",
        "|---|---:|---:|---|",
    ]
    ratio_notes = {
        "vs_torch_save": "vs torch.save",
        "vs_torch_save_fsync": "vs torch.save + fsync",
        "vs_torch_load": "vs torch.load",
        "vs_torch_load_fresh": "vs torch.load in a fresh process",
        "vs_sync_save": "vs steadyfit save",
        "step_cost_vs_sync_save": "more than no save, vs steadyfit save",
    }
    for name, row in summary.items():
        ratios = ", ".join(f"{row[key]:.2f}× {label}" for key, label in ratio_notes.items() if key in row)
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f}–{row['max_s']:.3f} | {ratios} |")
    sync = summary["steadyfit save"]
    blocked = summary["steadyfit async, blocked"]["vs_sync_save"]
    step_cost = summary["training step, save in flight"]["step_cost_vs_sync_save"]
    load = summary["steadyfit load"]["vs_torch_load"]
    fresh = summary["steadyfit load, fresh process"]["vs_torch_load_fresh"]
    lines += [
        "",
        f"Targets: sync save ≤ {SYNC_SAVE_TARGET}× torch.save + fsync: "
        f"{'met' if sync['vs_torch_save_fsync'] <= SYNC_SAVE_TARGET else 'NOT met'} "
        f"({sync['vs_torch_save_fsync']:.2f}×; {sync['vs_torch_save']:.2f}× the raw torch.save); "
        f"verified load ≤ {VERIFIED_LOAD_TARGET}× torch.load: "
        f"{'met' if load <= VERIFIED_LOAD_TARGET else 'NOT met'} ({load:.2f}×; in a fresh process, as a "
        f"resume loads: {'met' if fresh <= VERIFIED_LOAD_TARGET else 'NOT met'}, {fresh:.2f}×); "
        f"async blocking ≤ {ASYNC_BLOCKING_TARGET:.0%} of a sync save: "
        f"{'met' if blocked <= ASYNC_BLOCKING_TARGET else 'NOT met'} ({blocked:.0%}; the step with a save "
        f"in flight took {step_cost:.0%} of a sync save longer than without).",
    ]
    return "\n".join(lines)


def handoff(widths: tuple[int, ...], saves: int, workdir: Path) -> list[dict[str, float]]:
    """Per width: the optimizer state's bytes and the median blocked time of a save, copied at submit and
    deferred (see the module docstring)."""
    rows = []
    for width in widths:
        torch.manual_seed(0)
        layers = torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 10)
        model = torch.nn.Sequential(*layers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = torch.randn(64, width)
        model(batch).square().mean().backward()
        optimizer.step()
        state = [value for per_parameter in optimizer.state.values() for value in per_parameter.values()]
        components = {"optimizer": optimizer.state_dict()}
        blocked: dict[bool, list[float]] = {False: [], True: []}
        store = CheckpointStore(workdir / f"handoff-{width}")
        with AsyncCheckpointWriter(store) as writer:
            for deferred in (False, True) * saves:
                writer.submit(1, model.state_dict(), components, copy_later=state if deferred else ())
                model(batch).square().mean().backward()
                writer.wait_staged()
                blocked[deferred].append(writer.blocked_s)
                optimizer.step()
                optimizer.zero_grad()
                writer.wait()
        shutil.rmtree(store.run_dir)
        rows.append(
            {
                "width": width,
                "state_bytes": sum(value.numel() * value.element_size() for value in state),
                "at_submit_s": statistics.median(blocked[False]),
                "deferred_s": statistics.median(blocked[True]),
            }
        )
    return rows


def handoff_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| width | optimizer state MB | blocked, copied at submit, µs | blocked, deferred, µs |",
        "|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['width']} | {row['state_bytes'] / 1e6:.2f} | {row['at_submit_s'] * 1e6:.0f} "
            f"| {row['deferred_s'] * 1e6:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=4, help="interleaved repetitions (default 4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary dir)")
    parser.add_argument("--smoke", action="store_true", help="a ~14 MB state, 2 repetitions, for CI")
    parser.add_argument("--handoff", action="store_true", help="blocked time by state size, deferred or not")
    parser.add_argument("--time-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_load:
        kind, path = args.time_load
        print(time_load(kind, Path(path)))
        return 0
    if args.handoff:
        widths, saves = ((64,), 2) if args.smoke else ((256, 384, 512, 640, 768, 1024, 1536), 15)
        threshold, DeferredCopies.MIN_BYTES = DeferredCopies.MIN_BYTES, 0  # every size deferred when asked
        try:
            with tempfile.TemporaryDirectory(prefix="bench-handoff-", dir=args.dir) as workdir:
                rows = handoff(widths, saves, Path(workdir))
        finally:
            DeferredCopies.MIN_BYTES = threshold
        print(handoff_table(rows))
        if args.json is not None:
            args.json.write_text(json.dumps({"smoke": args.smoke, "handoff": rows}, indent=2) + "\n")
        return 0
    if args.reps < 2 and not args.smoke:
        raise SystemExit("--reps: must be at least 2 (every other repetition times the async save as before)")
    reps = 2 if args.smoke else args.reps
    # 6 layers of 2048 x 2048 fp32: 25.2 M parameters, 100.7 MB of weights.
    # Smoke: 2 layers of 768, whose 9.4 MB of moments are past DeferredCopies.MIN_BYTES (the deferred path).
    model, optimizer = build_state(*((768, 2) if args.smoke else (2048, 6)))
    size = state_bytes(model, optimizer)

    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-", dir=args.dir) as workdir:
        # A discarded warm-up round: the first write of a few hundred MB in a process costs 2-4x the next
        # ones (first-touch page allocation), whichever variant runs first.
        one_repetition(model, optimizer, Path(workdir), rep=-1)
        for rep in range(reps):
            print(f"[rep {rep + 1}/{reps}]", file=sys.stderr, flush=True)
            for name, seconds in one_repetition(model, optimizer, Path(workdir), rep).items():
                samples.setdefault(name, []).append(seconds)
    summary = summarise(samples)
    print(markdown_table(summary, size, reps))
    if args.json is not None:
        report = {
            "smoke": args.smoke,
            "reps": reps,
            "state_bytes": size,
            "summary": summary,
            "samples": samples,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
