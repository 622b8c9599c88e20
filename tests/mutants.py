"""`make mutants`: prove the suite guards every promise of DESIGN.md.

Each mutant is one deliberate one-line break of one guarantee. It is applied to a copy of the repository
(src, tests, bench, pyproject.toml), the tests named beside it run there, and the mutant counts as caught
only when they fail (pytest exit status 1: a test failed, not a collection or usage error). A mutant that
survives means that guarantee has no test that would notice it breaking; the script then exits 1.
docs/guarantees.md lists every break beside the tests that catch it.

    python tests/mutants.py            # every mutant (a few minutes on 2 cores)
    python tests/mutants.py --only weighting --only horizon
    python tests/mutants.py --check    # only that every break still applies to the source, exactly once
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    guarantee: str
    file: str
    line: str
    broken: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "weighting",
        "1. exact accumulation: a mean-of-means instead of sample weighting",
        "src/steadyfit/accumulation.py",
        "backward_loss = value * (num_samples / window_samples)",
        "backward_loss = value / len(pieces)",
        ("tests/parity/test_accumulation.py",),
    ),
    Mutant(
        "token-normalisation",
        "1. exact accumulation: (sum, count) grads not divided by the window's count",
        "src/steadyfit/trainer.py",
        "self.backward.divide_grads(loss.count)",
        "pass",
        ("tests/parity/test_accumulation.py",),
    ),
    Mutant(
        "model-loss-count",
        "1. exact accumulation: a model's own token-mean loss weighted by samples, not by its tokens",
        "src/steadyfit/loss.py",
        "return torch.where(count > 0, loss.float() * count, 0.0), count",
        "return loss",
        ("tests/unit/test_hf.py",),
    ),
    Mutant(
        "rng-restore",
        "2. exact resume: the RNG streams are not restored",
        "src/steadyfit/components.py",
        'restore_rng(_this_ranks(state, self.dist, "rng: no per-rank RNG states"))',
        "pass",
        ("tests/resume/test_resume_inprocess.py",),
    ),
    Mutant(
        "skip-consumed",
        "2. exact resume: a resumed epoch starts over instead of skipping consumed batches",
        "src/steadyfit/data.py",
        "for start in range(self.start_batch * step, end, step):",
        "for start in range(0, end, step):",
        ("tests/property/test_sampler_resume.py", "tests/resume/test_resume_inprocess.py"),
    ),
    Mutant(
        "loader-epoch-start",
        "2. exact resume: a user DataLoader resumed mid-epoch starts from the checkpoint's streams",
        "src/steadyfit/data.py",
        "restore_streams(loader, self.epoch_start_streams)",
        "pass",
        ("tests/unit/test_user_data.py",),
    ),
    Mutant(
        "preempt-now",
        "4. preemption: a signal between read points is acted on later, not after the current step",
        "src/steadyfit/trainer.py",
        "or (preemption.is_set and not self.dist.is_distributed)",
        "or False",
        ("tests/resume/test_preempt_anywhere.py",),
    ),
    Mutant(
        "window-state",
        "2. exact resume: the logging window is not restored",
        "src/steadyfit/log_window.py",
        'self.loss_sum = float(state["loss_sum"])',
        "self.loss_sum = 0.0",
        ("tests/resume/test_preempt_anywhere.py",),
    ),
    Mutant(
        "worker-rng",
        "2. exact resume: data-loader workers' random streams depend on their history, not the position",
        "src/steadyfit/data.py",
        "torch.manual_seed(batch_seed)",
        "pass",
        ("tests/resume/test_resume.py::test_an_augmenting_dataset_resumes_bitwise",),
    ),
    Mutant(
        "manifest-hash",
        "3. crash-safe checkpoints: a file whose checksum differs from the manifest passes verification",
        "src/steadyfit/checkpoint/manifest.py",
        "elif record.digest != expected[algorithm]:",
        "elif False:",
        ("tests/unit/test_checkpoint_store.py",),
    ),
    Mutant(
        "rotation",
        "3. crash-safe checkpoints: rotation may delete the newest good checkpoint",
        "src/steadyfit/checkpoint/store.py",
        "protected.add(newest_good.resolve())",
        "pass",
        ("tests/unit/test_checkpoint_store.py",),
    ),
    Mutant(
        "rotation-in-place",
        "3. crash-safe checkpoints: rotation deletes a checkpoint's files in place (a crash leaves it torn)",
        "src/steadyfit/checkpoint/store.py",
        "os.rename(path, doomed)",
        "doomed = path",
        ("tests/unit/test_checkpoint_store.py",),
    ),
    Mutant(
        "held-best-dropped",
        "2. exact resume: an error drops the best checkpoint held in memory (the rerun starts over)",
        "src/steadyfit/checkpoint/manager.py",
        "if best is not None and commit_held_best:",
        "if False:",
        ("tests/unit/test_guard.py",),
    ),
    Mutant(
        "resumed-lr",
        "2. exact resume: with a longer max_steps, the first resumed step runs at the old schedule's lr",
        "src/steadyfit/trainer.py",
        "reapply_schedule(self.scheduler)  # this run's horizon from the restored step on",
        "pass",
        ("tests/resume/test_resume_inprocess.py",),
    ),
    Mutant(
        "staged-wait",
        "2. exact resume: the optimizer steps before a save's background copy of its state is made",
        "src/steadyfit/trainer.py",
        "self.checkpoints.wait_staged()  # the last save's copy of the optimizer state (_save)",
        "pass",
        ("tests/unit/test_checkpoint_staging.py",),
    ),
    Mutant(
        "callback-staged",
        "2. exact resume: a callback runs before a save's background copy of the optimizer state is made",
        "src/steadyfit/callbacks.py",
        "self.before_handlers()",
        "pass",
        ("tests/unit/test_checkpoint_staging.py",),
    ),
    Mutant(
        "weights-deferred",
        "2. exact resume: weights an optimizer keeps in its state are copied after the next forward writes",
        "src/steadyfit/trainer.py",
        "if isinstance(value, torch.Tensor) and memory_of(value) not in weights",
        "if isinstance(value, torch.Tensor)",
        ("tests/unit/test_checkpoint_staging.py",),
    ),
    Mutant(
        "content-damage",
        "3. a checkpoint whose content does not fit the run is loaded anyway, not skipped",
        "src/steadyfit/checkpoint/manager.py",
        "return next((message for message, _, _ in verdicts if message), None)",
        "return None",
        ("tests/unit/test_checkpoint_manager.py",),
    ),
    Mutant(
        "preemption-flag",
        "4. preemption: SIGTERM is not noticed",
        "src/steadyfit/signals.py",
        "            raise KeyboardInterrupt\n        self.signum = signum",
        "            raise KeyboardInterrupt",
        ("tests/resume/test_preempt_anywhere.py",),
    ),
    Mutant(
        "worker-signals",
        "4. preemption: DataLoader workers die of a SIGTERM sent to the process group (the fetch fails)",
        "src/steadyfit/data.py",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        "pass",
        ("tests/resume/test_resume.py", "-k", "process_group"),
    ),
    Mutant(
        "verify-before-parse",
        "5. safe loading: a checkpoint is parsed although it failed its manifest",
        "src/steadyfit/checkpoint/store.py",
        'raise CheckpointError(f"checkpoint {path} failed verification: " + "; ".join(faults))',
        "pass",
        ("tests/unit/test_checkpoint_store.py",),
    ),
    Mutant(
        "eval-average",
        "6. honest metrics: eval means over batches instead of samples",
        "src/steadyfit/metrics.py",
        "self.counts[0] += count",
        "self.counts[0] += 1",
        ("tests/unit/test_loop.py", "tests/property/test_metric_split.py"),
    ),
    Mutant(
        "train-loss-window",
        "6. honest metrics: the logged train loss is the last step's, not the window's mean",
        "src/steadyfit/log_window.py",
        "self.loss_sum += step_sum",
        "self.loss_sum = step_sum",
        ("tests/unit/test_loop.py",),
    ),
    Mutant(
        "finite-check",
        "7. non-finite values: a NaN/inf loss or gradient is stepped on",
        "src/steadyfit/guard.py",
        "return checked - checked",
        "return torch.zeros_like(checked)",
        ("tests/unit/test_guard.py",),
    ),
    Mutant(
        "device-skip",
        "7. non-finite values: the device-side check never tells the kernel to skip",
        "src/steadyfit/guard.py",
        "torch.ne(check, self._zero, out=self._found_inf)",
        "self._found_inf.zero_()",
        ("tests/unit/test_sync.py",),
    ),
    Mutant(
        "scaler-floor",
        "7. non-finite values: fp16 overflow below the smallest loss scale skipped forever, never counted",
        "src/steadyfit/trainer.py",
        "record.scaler_skip = bool(torch.isfinite(record.loss)) and scale >= SMALLEST_LOSS_SCALE",
        "record.scaler_skip = bool(torch.isfinite(record.loss))",
        ("tests/unit/test_precision.py",),
    ),
    Mutant(
        "horizon",
        "8. rank equivalence: steps per epoch from the per-rank batch, not the global one",
        "src/steadyfit/horizons.py",
        "batches = batches_per_epoch(train_data, config.batch_size, world_size)",
        "batches = batches_per_epoch(train_data, config.batch_size)",
        ("tests/unit/test_horizons.py",),
    ),
    Mutant(
        "rank-normalisation",
        "8. rank equivalence: gradients summed over ranks are not divided by the global count",
        "src/steadyfit/accumulation.py",
        "self.divide_grads(totals[0] / self.dist.world_size)",
        "self.divide_grads(totals[0])",
        ("tests/distributed/test_rank_equivalence.py",),
    ),
    Mutant(
        "micro-pieces",
        "8. rank equivalence: each rank cuts its own share into pieces (the passes stop pairing up)",
        "src/steadyfit/accumulation.py",
        "needed = -(-largest_shares[index] // limit) if largest_shares is not None else len(cut)",
        "needed = len(cut)",
        ("tests/distributed/test_rank_equivalence.py",),
    ),
    Mutant(
        "host-read",
        "9. low overhead: every step becomes a read point (a host read each step)",
        "src/steadyfit/trainer.py",
        "or len(self._unbooked) >= device_skip.horizon",
        "or True",
        ("tests/unit/test_sync.py",),
    ),
)


def apply(mutant: Mutant, root: Path) -> None:
    """Break ``root``'s copy of the mutant's file: its line, which must occur exactly once, replaced."""
    path = root / mutant.file
    text = path.read_text(encoding="utf-8")
    found = text.count(mutant.line)
    if found != 1:
        raise SystemExit(f"mutant {mutant.name}: {mutant.line!r} occurs {found} times in {mutant.file}")
    path.write_text(text.replace(mutant.line, mutant.broken), encoding="utf-8")


def run(mutant: Mutant) -> tuple[bool, float, str]:
    """Apply ``mutant`` to a fresh copy and run its tests there: (caught, seconds, last output line)."""
    with tempfile.TemporaryDirectory(prefix=f"steadyfit-mutant-{mutant.name}-") as scratch:
        copy = Path(scratch)
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
        for folder in ("src", "tests", "bench"):
            shutil.copytree(ROOT / folder, copy / folder, ignore=ignore)
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        apply(mutant, copy)
        started = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy / "src")},
            capture_output=True,
            text=True,
        )
        lines = (completed.stdout + completed.stderr).strip().splitlines()
        # 1: tests failed. 0 would be a survivor; 2-5 are errors that prove nothing about the tests.
        return completed.returncode == 1, time.perf_counter() - started, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", default=[], help="run only this mutant (repeatable)")
    parser.add_argument("--check", action="store_true", help="only check that every break applies")
    args = parser.parse_args()
    names = {mutant.name for mutant in MUTANTS}
    unknown = set(args.only) - names
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; known: {sorted(names)}")
    chosen = [mutant for mutant in MUTANTS if not args.only or mutant.name in args.only]
    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            for mutant in chosen:
                target = Path(scratch) / mutant.file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / mutant.file, target)
                apply(mutant, Path(scratch))
        print(f"mutants: all {len(chosen)} breaks apply")
        return 0
    survivors = []
    for mutant in chosen:
        caught, seconds, last = run(mutant)
        verdict = "caught" if caught else "SURVIVED"
        print(f"{verdict:8}  {mutant.name:20} {seconds:5.1f}s  {mutant.guarantee}  [{last}]", flush=True)
        if not caught:
            survivors.append(mutant.name)
    if survivors:
        print(f"mutants: {len(survivors)} of {len(chosen)} survived: {', '.join(survivors)}")
        return 1
    print(f"mutants: all {len(chosen)} caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
