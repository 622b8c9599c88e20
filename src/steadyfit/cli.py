"""The command line: ``steadyfit fit | report``, with every exit status in one table."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import TextIO

from steadyfit.assembly import train
from steadyfit.checkpoint import CheckpointError, RunLockedError
from steadyfit.config import ConfigError
from steadyfit.data import BatchError
from steadyfit.guard import NonFiniteError
from steadyfit.layout import CHECKPOINTS_DIR, FINAL_DIR, FINAL_MODEL_FILE, METRICS_FILE
from steadyfit.loggers.base import LoggerError
from steadyfit.loss import LossContractError
from steadyfit.secrets import redact_text, secret_env_values
from steadyfit.signals import Preempted

# Exit statuses (DESIGN.md): 0 done, 2 bad config or usage, 143/130 preempted with a checkpoint, 1 otherwise.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def run_fit(source: str | None, overrides: list[str]) -> int:
    """``steadyfit fit``: train, then say where the results are."""
    trainer, result = train(source, overrides)
    metrics = " ".join(f"{key}={value:.4f}" for key, value in result.metrics.items())
    _say(f"steadyfit: done at step {result.global_step} (epoch {result.epoch}) {metrics}")
    if result.best_metric is not None:
        kept = " (the final weights)" if trainer.config.load_best_at_end else ""
        best = f"{trainer.tracker.metric}={result.best_metric:.4f} at step {result.best_step}"
        _say(f"steadyfit: best {best}{kept}")
    if trainer.config.fast_dev_run:
        _say(f"steadyfit: fast_dev_run: nothing was kept; {trainer.config.run_dir} is untouched")
        return EXIT_OK
    where = f"{METRICS_FILE}, {CHECKPOINTS_DIR}/, {FINAL_DIR}/{FINAL_MODEL_FILE}"
    _say(f"steadyfit: run directory {trainer.config.run_dir} ({where})")
    return EXIT_OK


def run_lr_find(
    source: str | None, overrides: list[str], out: str | None, min_lr: float, max_lr: float, num_steps: int
) -> int:
    """``steadyfit lr-find``: an LR sweep on a copy of the model; the run directory gets only the plot."""
    from steadyfit.lr_finder import lr_find_command

    result = lr_find_command(source, overrides, out, min_lr=min_lr, max_lr=max_lr, num_steps=num_steps)
    _say(f"steadyfit: {result.summary()}")
    return EXIT_OK


def run_sweep_command(args: argparse.Namespace) -> int:
    """``steadyfit sweep``: an Optuna search, each trial a normal run under the sweep directory."""
    from steadyfit.sweep import run_sweep

    study = run_sweep(args.source, args.space, args.trials, args.dir, args.workers, args.overrides)
    finished = [trial for trial in study.trials if trial.state.name in ("COMPLETE", "PRUNED")]
    return EXIT_OK if finished else EXIT_FAILURE  # every trial failed: a script must not read success


def run_sample(args: argparse.Namespace) -> int:
    """``steadyfit sample``: text generated from a finished tinylm run's final weights."""
    from steadyfit.sample import sample_run

    print(
        sample_run(
            args.run_dir, prompt=args.prompt, chars=args.chars, temperature=args.temperature, seed=args.seed
        )
    )
    return EXIT_OK


def run_report(run_dir: str, compare: list[str], out: str | None) -> int:
    """``steadyfit report``: figures and a text summary of a run (also one in progress)."""
    from steadyfit.report import format_summary, summarize, write_report

    if not Path(run_dir, METRICS_FILE).exists():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; is it a steadyfit run directory?")
    _say(format_summary(summarize(run_dir)))
    written = write_report(run_dir, compare=compare, out=out)
    for path in written:
        _say(f"steadyfit: wrote {path}")
    if not written:  # a run that has just started: not an error for a script that polls it
        _say("steadyfit: no train or eval row to plot yet; no figure written")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steadyfit", description="Train PyTorch models you can trust.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train a recipe or a YAML config (default: the digits recipe)")
    fit.add_argument("source", nargs="?", help="built-in recipe, package.module:function, or config.yaml")
    fit.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. lr=3e-4 max_epochs=5")
    lr_find = commands.add_parser("lr-find", help="sweep the learning rate on a copy of the model")
    lr_find.add_argument("source", nargs="?", help="built-in recipe, package.module:function, or config.yaml")
    lr_find.add_argument("overrides", nargs="*", help="key=value config overrides")
    lr_find.add_argument("--out", help="path of the PNG (default RUN_DIR/lr_find.png)")
    lr_find.add_argument("--min-lr", type=float, default=1e-7)
    lr_find.add_argument("--max-lr", type=float, default=10.0)
    lr_find.add_argument("--num-steps", type=int, default=100)
    sweep = commands.add_parser("sweep", help="hyperparameter search with Optuna (resumable)")
    sweep.add_argument("source", nargs="?", help="built-in recipe, package.module:function, or config.yaml")
    sweep.add_argument("overrides", nargs="*", help="key=value config overrides for every trial")
    sweep.add_argument("--space", required=True, help="YAML search space (see docs/sweeps.md)")
    sweep.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    sweep.add_argument("--workers", type=int, default=1, help="trials run in parallel processes")
    sweep.add_argument("--dir", help="sweep directory (default sweeps/<recipe or config name>)")
    sample = commands.add_parser("sample", help="generate text from a finished tinylm run")
    sample.add_argument("run_dir")
    sample.add_argument("--prompt", default="def ")
    sample.add_argument("--chars", type=int, default=300)
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--seed", type=int, default=0)
    report = commands.add_parser("report", help="plots and a summary of a run directory")
    report.add_argument("run_dir")
    report.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR", help="runs to overlay")
    report.add_argument("--out", help="path of the PNG to write (default RUN_DIR/report.png)")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse the command line with ``key=value`` overrides allowed anywhere, before or after options
    (``steadyfit sweep digits --space s.yaml --trials 20 max_steps=300``): argparse alone takes positionals
    only before the first option.

    Example:
        >>> argv = ["sweep", "digits", "--space", "s.yaml", "--trials", "2", "max_steps=30"]
        >>> parse_arguments(build_parser(), argv).overrides
        ['max_steps=30']
        >>> args = parse_arguments(build_parser(), ["fit", "lr=0.1", "digits", "max_steps=30"])
        >>> args.source, args.overrides
        ('digits', ['lr=0.1', 'max_steps=30'])
        >>> argv = ["sweep", "lr=0.1", "--space", "s.yaml", "--trials", "2", "digits"]
        >>> args = parse_arguments(build_parser(), argv)
        >>> args.source, args.overrides
        ('digits', ['lr=0.1'])
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        # Positionals after an option (an override or the recipe) come back as extras; options do not.
        stray = [item for item in extras if item.startswith("-")]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
        args.overrides.extend(extras)
    if hasattr(args, "source"):
        # The recipe or config is the one positional that is not key=value (or a file whose name has
        # one), wherever it stands: `fit max_steps=30 digits` reads as `fit digits max_steps=30`.
        given = ([args.source] if args.source else []) + args.overrides
        sources = [item for item in given if "=" not in item or Path(item).exists()]
        if len(sources) > 1:
            parser.error(f"one recipe or config at most, got {' '.join(sources)}")
        args.source = sources[0] if sources else None
        args.overrides = [item for item in given if item not in sources]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steadyfit`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return EXIT_USAGE if exc.code else EXIT_OK
    # `steadyfit fit mymod:recipe` finds mymod.py in the current directory, as `python -m steadyfit` does;
    # the console script alone would not. Last on the path: a stray file there never shadows a library.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        if args.command == "fit":
            return run_fit(args.source, args.overrides)
        if args.command == "sample":
            return run_sample(args)
        if args.command == "sweep":
            return run_sweep_command(args)
        if args.command == "lr-find":
            return run_lr_find(
                args.source, args.overrides, args.out, args.min_lr, args.max_lr, args.num_steps
            )
        return run_report(args.run_dir, args.compare, args.out)
    except (ConfigError, RunLockedError) as exc:
        _say(f"steadyfit: error: {exc}", sys.stderr)
        return EXIT_USAGE
    except Preempted as exc:
        if exc.checkpoint is None:  # a run with nothing to resume (lr-find's sweep)
            _say(f"steadyfit: stopped by signal {exc.signum}; nothing to resume", sys.stderr)
        else:
            _say(f"steadyfit: preempted; rerun the same command to resume from {exc.checkpoint}", sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        print("steadyfit: interrupted", file=sys.stderr)
        return 130
    except (BatchError, CheckpointError, LoggerError, NonFiniteError, LossContractError) as exc:
        _say(f"steadyfit: error: {exc}", sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # Whoever read our output stopped (`steadyfit report RUN | head`): nothing to tell it, no traceback.
        # Python would flush stdout into the closed pipe again on exit; it writes to /dev/null instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception:
        _say(traceback.format_exc().rstrip("\n"), sys.stderr)
        return EXIT_FAILURE


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print to stdout (or ``stream``) with secrets masked: messages, paths and tracebacks echo config
    values and URLs (a password in MLFLOW_TRACKING_URI, in resume=... or inside run_dir)."""
    print(redact_text(text, secret_env_values()), file=stream)


if __name__ == "__main__":
    sys.exit(main())
