"""Turn a recipe or config file plus ``key=value`` overrides into a configured Trainer, and train it.

Shared by ``steadyfit fit``, the LR finder and sweeps, so they all resolve configs the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steadyfit.callbacks import Callback
from steadyfit.config import ConfigError, TrainConfig, make_config, parse_overrides, read_yaml
from steadyfit.recipes import BUILTIN, build_recipe, default_config_path
from steadyfit.state import FitResult

if TYPE_CHECKING:
    from steadyfit.trainer import Trainer

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


def prepare(source: str | None, overrides: list[str] | dict[str, Any] = ()) -> tuple[str, TrainConfig]:
    """The recipe name and the validated config for a source and overrides (strings or a dict)."""
    if isinstance(overrides, dict):
        recipe_name, values = resolve_fit_config(source, [])
        values.update(overrides)
    else:
        recipe_name, values = resolve_fit_config(source, list(overrides))
    return recipe_name, make_config(values)


def build_trainer(recipe_name: str, config: TrainConfig, callbacks: Iterable[Callback] = ()) -> Trainer:
    """Seed, build the recipe (so its model is the same every run), and wrap it in a Trainer."""
    from steadyfit.trainer import Trainer

    recipe = build_recipe(recipe_name, config)
    return Trainer(
        recipe.model,
        config,
        train_data=recipe.train_data,
        eval_data=recipe.eval_data,
        loss_fn=recipe.loss_fn,
        metrics=recipe.metrics,
        collate_fn=recipe.collate_fn,
        callbacks=callbacks,
    )


def train(
    source: str | None, overrides: list[str] | dict[str, Any] = (), callbacks: Iterable[Callback] = ()
) -> tuple[Trainer, FitResult]:
    """Resolve, build and fit; returns the trainer and its result.

    Example:
        >>> trainer, result = train("digits", ["max_steps=5", "run_dir=/tmp/x"])  # doctest: +SKIP
    """
    recipe_name, config = prepare(source, overrides)
    trainer = build_trainer(recipe_name, config, callbacks)
    return trainer, trainer.fit()
