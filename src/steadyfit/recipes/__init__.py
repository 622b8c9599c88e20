"""Built-in recipes and the lookup of user recipes named ``package.module:function``."""

from __future__ import annotations

import importlib
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steadyfit.config import ConfigError, TrainConfig

BUILTIN = ("digits", "tinylm")
RECIPE_DIR = Path(__file__).parent


@dataclass
class Recipe:
    """What a recipe function returns: everything the Trainer needs besides the config.

    A recipe is a function ``build(config: TrainConfig) -> Recipe``. It is called after the run has been
    seeded, so a model built inside it is reproducible.
    """

    model: torch.nn.Module
    train_data: Any
    eval_data: Any = None
    loss_fn: Callable[..., Any] | None = None
    metrics: dict[str, Callable[..., Any]] = field(default_factory=dict)
    collate_fn: Callable[..., Any] | None = None


def default_config_path(name: str) -> Path:
    """The YAML of a built-in recipe: its defaults, and a template users can copy."""
    return RECIPE_DIR / f"{name}.yaml"


def resolve_recipe(name: str) -> Callable[[TrainConfig], Recipe]:
    """Find a recipe function by built-in name or ``package.module:function``.

    Raises:
        ConfigError: when the name is unknown or cannot be imported.
    """
    if name in BUILTIN:
        module = importlib.import_module(f"steadyfit.recipes.{name}")
        return module.build
    module_name, sep, function_name = name.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(
            f"recipe: {name!r} is neither a built-in recipe ({', '.join(BUILTIN)}) "
            "nor a 'package.module:function' entry point"
        )
    if module_name.startswith("."):
        raise ConfigError(
            f"recipe: {name!r} names a relative module; give its absolute name (package.module:function)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"recipe: cannot import module {module_name!r} ({exc}); the command line looks in the current "
            "directory, set PYTHONPATH for a module elsewhere"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"recipe: module {module_name!r} has no function {function_name!r}")
    return function


def build_recipe(name: str, config: TrainConfig) -> Recipe:
    """Seed the run, then call the recipe ``name`` with ``config`` (so its model is the same every run).

    Raises:
        ConfigError: when the recipe cannot be found or returns something other than a :class:`Recipe`.
    """
    from steadyfit.rng import seed_everything

    build = resolve_recipe(name)
    seed_everything(config.seed)  # before the model is built: its initial weights depend on the seed
    recipe = build(config)
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"recipe: {name!r} returned {reprlib.repr(recipe)} ({type(recipe).__name__}), not a "
            "steadyfit.Recipe; a recipe function takes the TrainConfig and returns "
            "steadyfit.Recipe(model, train_data, ...)"
        )
    return recipe
