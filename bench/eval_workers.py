"""What an evaluation costs when its DataLoader workers start at every evaluation, and when they are kept.

One fit of the ``workers`` job of ``bench/overhead.py`` (an MLP over a dataset whose ``__getitem__`` burns
CPU like a decode, 2 workers), evaluating every 20 steps on 512 samples of the same kind, run once with
``persistent_workers=false`` (each evaluation starts 2 worker processes and stops them) and once with
``persistent_workers=true`` (the eval workers live from one evaluation to the next). After a discarded
warm-up round, each repetition runs both fits, in alternating order, in this process; the table reports
medians (min–max) over the repetitions of:

- ``ms per evaluation``: the wall time of ``Trainer.evaluate`` inside the fit, averaged over the fit's
  evaluations (the first evaluation of a kept loader starts its workers: that cost is in the average);
- ``fit s``: the whole ``fit()``.

Both fits must log the same eval losses (they read the same batches): the script fails otherwise.

Usage::

    python bench/eval_workers.py                     # 3 repetitions, markdown table
    python bench/eval_workers.py --reps 5 --json eval_workers.json
    python bench/eval_workers.py --smoke             # a few steps, 1 repetition (CI; no timing claims)
"""

from __future__ import annotations

import argparse
import json
import statistics
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

from overhead import SEED, SlowDataset, _mlp, _teacher_data  # noqa: E402
from steadyfit import TrainConfig, Trainer  # noqa: E402

SETTINGS = {"fresh workers at every evaluation": False, "kept workers (persistent_workers=true)": True}
EVAL_EVERY = 20


def one_fit(persistent: bool, smoke: bool, run_dir: Path) -> dict[str, Any]:
    """Train the job once; returns the fit's wall time, its evaluations' times and its eval losses."""
    train_samples = 640 if smoke else 2560
    inputs, targets = _teacher_data(train_samples + (128 if smoke else 512), 32, 10, SEED)
    torch.manual_seed(SEED)
    model = _mlp([32, 64, 64, 10])
    config = TrainConfig(
        run_dir=str(run_dir),
        seed=SEED,
        max_steps=2 * 4 if smoke else 10 * EVAL_EVERY,
        max_epochs=1000,
        batch_size=64,
        eval_batch_size=64,
        eval_every=4 if smoke else EVAL_EVERY,
        log_every=0,
        save_every=0,
        num_workers=2,
        persistent_workers=persistent,
        progress=False,
        device="cpu",
    )
    trainer = Trainer(
        model,
        config,
        train_data=SlowDataset(inputs[:train_samples], targets[:train_samples], work=2000),
        eval_data=SlowDataset(inputs[train_samples:], targets[train_samples:], work=2000),
        loss_fn=torch.nn.functional.cross_entropy,
    )
    evaluations: list[float] = []
    losses: list[float] = []
    evaluate: Callable[..., dict[str, float]] = trainer.evaluate

    def timed_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        start = time.perf_counter()
        scores = evaluate(*args, **kwargs)
        evaluations.append(time.perf_counter() - start)
        losses.append(scores["eval_loss"])
        return scores

    trainer.evaluate = timed_evaluate  # type: ignore[method-assign]
    start = time.perf_counter()
    trainer.fit()
    return {
        "fit_s": time.perf_counter() - start,
        "per_evaluation_s": statistics.fmean(evaluations),
        "evaluations": len(evaluations),
        "eval_losses": losses,
    }


def one_repetition(smoke: bool, workdir: Path, rep: int) -> dict[str, dict[str, Any]]:
    order = list(SETTINGS.items())
    if rep % 2:
        order.reverse()  # neither setting always runs first
    results = {}
    for name, persistent in order:
        with tempfile.TemporaryDirectory(prefix="run-", dir=workdir) as run_dir:
            results[name] = one_fit(persistent, smoke, Path(run_dir))
    fresh, kept = (results[name]["eval_losses"] for name in SETTINGS)
    if fresh != kept:
        raise RuntimeError(f"the two settings evaluated differently: {fresh} against {kept}")
    return results


def summarise(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for name, fits in samples.items():
        per_eval = [fit["per_evaluation_s"] for fit in fits]
        fit_s = [fit["fit_s"] for fit in fits]
        summary[name] = {
            "evaluations": fits[0]["evaluations"],
            "per_evaluation_median_s": statistics.median(per_eval),
            "per_evaluation_min_s": min(per_eval),
            "per_evaluation_max_s": max(per_eval),
            "fit_median_s": statistics.median(fit_s),
            "fit_min_s": min(fit_s),
            "fit_max_s": max(fit_s),
        }
    fresh = summary[next(iter(SETTINGS))]["per_evaluation_median_s"]
    for row in summary.values():
        row["vs_fresh"] = row["per_evaluation_median_s"] / fresh
    return summary


def markdown_table(summary: dict[str, dict[str, float]], reps: int) -> str:
    lines = [
        f"Medians (min–max) of {reps} repetition(s), {next(iter(summary.values()))['evaluations']} "
        "evaluations per fit, 2 eval workers.",
        "",
        "| eval loader | ms per evaluation | vs fresh | fit s |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['per_evaluation_median_s'] * 1e3:.1f} "
            f"({row['per_evaluation_min_s'] * 1e3:.1f}–{row['per_evaluation_max_s'] * 1e3:.1f}) "
            f"| {row['vs_fresh']:.2f}x | {row['fit_median_s']:.2f} "
            f"({row['fit_min_s']:.2f}–{row['fit_max_s']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of both fits (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="a few steps, 1 repetition, for CI")
    args = parser.parse_args(argv)
    if args.reps < 1:
        raise SystemExit("--reps: must be at least 1")
    reps = 1 if args.smoke else args.reps
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="bench-eval-workers-") as workdir:
        one_repetition(args.smoke, Path(workdir), rep=-1)  # warm-up: imports, first forks, allocator
        for rep in range(reps):
            print(f"[rep {rep + 1}/{reps}]", file=sys.stderr, flush=True)
            for name, fit in one_repetition(args.smoke, Path(workdir), rep).items():
                samples[name].append(fit)
    summary = summarise(samples)
    print(markdown_table(summary, reps))
    if args.json is not None:
        report = {"smoke": args.smoke, "reps": reps, "summary": summary, "samples": samples}
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
