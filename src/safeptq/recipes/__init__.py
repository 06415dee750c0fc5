"""Typed recipes (pydantic, ``extra="forbid"``): one per method, with named presets defined once
and used by both the Python API and the command line. Every run writes its resolved
``recipe.yaml``; :func:`load_recipe` reads one back (``safeptq run``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .aaq import AAQ_PRESETS, AAQRecipe
from .base import BaseRecipe, CalibRecipe, EvalRecipe, RecipeError
from .overrides import apply_overrides, field_paths
from .quantize import BlockTraining, QuantizeRecipe, parse_epochs
from .realign import SCHEDULES, RealignRecipe

__all__ = ["AAQRecipe", "AAQ_PRESETS", "BaseRecipe", "BlockTraining", "CalibRecipe", "EvalRecipe",
           "QuantizeRecipe", "RealignRecipe", "RecipeError", "SCHEDULES", "RECIPE_FILE", "recipe_class",
           "make_recipe", "load_recipe", "field_paths", "parse_epochs"]

RECIPE_FILE = "recipe.yaml"


def recipe_class(method: str) -> type[BaseRecipe]:
    """The recipe type of a method (Q-realign and AAQ have their own; the others share one)."""
    return {"realign": RealignRecipe, "aaq": AAQRecipe}.get(str(method), QuantizeRecipe)


def make_recipe(cls: type[BaseRecipe], recipe: BaseRecipe | dict | str | Path | None = None,
                **overrides: Any) -> BaseRecipe:
    """A validated recipe of type ``cls`` from an optional starting recipe (object, dict or YAML
    path) plus keyword overrides (see :mod:`safeptq.recipes.overrides`)."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    if isinstance(recipe, BaseRecipe):
        if not isinstance(recipe, cls):
            raise ConfigError(f"a {type(recipe).__name__} cannot run as a {cls.__name__}")
        data = recipe.model_dump(exclude_unset=True)
    else:
        data = dict(recipe or {})
    return cls.build(apply_overrides(cls, data, overrides))


def load_recipe(path: str | Path) -> BaseRecipe:
    """Read a ``recipe.yaml`` (or a run folder holding one); the ``method`` field picks its type."""
    import yaml

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / RECIPE_FILE
    if not p.is_file():
        raise ConfigError(f"recipe {p} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"recipe {p} has no 'method' field")
    return recipe_class(data["method"]).build(data)
