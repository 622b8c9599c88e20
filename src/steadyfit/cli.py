"""The command line: ``steadyfit fit | report``, with every exit status in one table."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

from steadyfit.checkpoint import CheckpointError, RunLockedError
from steadyfit.config import ConfigError, make_config, parse_overrides, read_yaml
from steadyfit.guard import NonFiniteError
from steadyfit.loss import LossContractError
from steadyfit.recipes import BUILTIN, default_config_path, resolve_recipe
from steadyfit.signals import Preempted

# Exit statuses (DESIGN.md): 0 done, 2 bad config or usage, 143/130 preempted with a checkpoint, 1 otherwise.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_RECIPE = "digits"


def resolve_fit_config(source: str | None, overrides: list[str]) -> tuple[str, dict[str, Any]]:
    """Merge a recipe's defaults, a YAML file and ``key=value`` overrides; returns (recipe, fields).

    Raises:
        ConfigError: for a missing file, unknown recipe or bad override.
    """
    file_values: dict[str, Any] = {}
    if source is None:
        recipe = DEFAULT_RECIPE
    elif source.endswith((".yaml", ".yml")) or Path(source).is_file():
        file_values = read_yaml(source)
        recipe = file_values.pop("recipe", None)
        if not recipe:
            raise ConfigError(
                f"{source}: no 'recipe:' field; name a built-in recipe ({', '.join(BUILTIN)}) "
                "or 'package.module:function'"
            )
    else:
        recipe = source
    values: dict[str, Any] = {}
    if recipe in BUILTIN:
        values.update(read_yaml(default_config_path(recipe)))
        values.pop("recipe", None)
    values.update(file_values)
    override_values = parse_overrides(overrides)
    if "recipe" in override_values:
        raise ConfigError("recipe: choose the recipe with the first argument, not as key=value")
    values.update(override_values)
    return str(recipe), values


def run_fit(source: str | None, overrides: list[str]) -> int:
    """``steadyfit fit``: build the recipe after seeding, train, print where the results are."""
    from steadyfit.rng import seed_everything
    from steadyfit.trainer import Trainer

    recipe_name, values = resolve_fit_config(source, overrides)
    config = make_config(values)
    build = resolve_recipe(recipe_name)
    seed_everything(config.seed)  # before the model is built: its initial weights depend on the seed
    recipe = build(config)
    trainer = Trainer(
        recipe.model,
        config,
        train_data=recipe.train_data,
        eval_data=recipe.eval_data,
        loss_fn=recipe.loss_fn,
        metrics=recipe.metrics,
        collate_fn=recipe.collate_fn,
    )
    result = trainer.fit()
    metrics = " ".join(f"{key}={value:.4f}" for key, value in result.metrics.items())
    print(f"steadyfit: done at step {result.global_step} (epoch {result.epoch}) {metrics}")
    if result.best_metric is not None:
        print(f"steadyfit: best {trainer.tracker.metric}={result.best_metric:.4f} at step {result.best_step}")
    print(f"steadyfit: run directory {config.run_dir} (metrics.jsonl, checkpoints/, final/model.safetensors)")
    return EXIT_OK


def run_report(run_dir: str, compare: list[str], out: str | None) -> int:
    """``steadyfit report``: figures and a text summary of a run (also one in progress)."""
    from steadyfit.report import format_summary, summarize, write_report

    if not Path(run_dir, "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir}: no metrics.jsonl here; is it a steadyfit run directory?")
    print(format_summary(summarize(run_dir)))
    for path in write_report(run_dir, compare=compare, out=out):
        print(f"steadyfit: wrote {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steadyfit", description="Train PyTorch models you can trust.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train a recipe or a YAML config (default: the digits recipe)")
    fit.add_argument("source", nargs="?", help="built-in recipe, package.module:function, or config.yaml")
    fit.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. lr=3e-4 max_epochs=5")
    report = commands.add_parser("report", help="plots and a summary of a run directory")
    report.add_argument("run_dir")
    report.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR", help="runs to overlay")
    report.add_argument("--out", help="path of the PNG to write (default RUN_DIR/report.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``steadyfit`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage message
        return EXIT_USAGE if exc.code else EXIT_OK
    if args.command == "fit" and args.source and "=" in args.source and not Path(args.source).exists():
        args.overrides.insert(0, args.source)  # `steadyfit fit lr=1e-3`: no source, overrides only
        args.source = None
    try:
        if args.command == "fit":
            return run_fit(args.source, args.overrides)
        return run_report(args.run_dir, args.compare, args.out)
    except (ConfigError, RunLockedError) as exc:
        print(f"steadyfit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Preempted as exc:
        print(
            f"steadyfit: preempted; rerun the same command to resume from {exc.checkpoint}", file=sys.stderr
        )
        return int(exc.code)
    except KeyboardInterrupt:
        print("steadyfit: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, NonFiniteError, LossContractError) as exc:
        print(f"steadyfit: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception:
        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
