"""Recipe files: one complete YAML file per recipe, the defaults a ``recipe.name`` selects.

A recipe file holds two mappings, ``recipe`` (every key of
:class:`harness.core.config.recipe.RecipeConfig`, ``name`` included) and ``train`` (every key of
:class:`harness.core.config.train.TrainConfig`), with comments citing the paper, table and
section of each value and saying where a value is the harness's choice. The config loader merges
the file under what the user wrote, so nothing falls back to a schema default silently (the tests
check that every file sets every field).

The files ship with :mod:`pretrain` (``pretrain/recipes/<name>.yaml``), which registers each in
:data:`harness.core.config.axes.RECIPES` when imported; this layer only reads them.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from harness.core.config.axes import RECIPES, check_name
from harness.core.config.base import ConfigError, deep_merge

#: The top-level keys of a recipe file.
RECIPE_FILE_KEYS = ("recipe", "train")


def recipe_names() -> list[str]:
    """The registered recipes, sorted (the values of ``recipe.name``)."""
    return RECIPES.names()


def recipe_file(name: str) -> dict[str, dict[str, Any]]:
    """The recipe file of ``name``: ``{"recipe": {...}, "train": {...}}`` (a copy to modify).

    Raises:
        ValueError: ``name`` is not a registered recipe (with a did-you-mean).
        ConfigError: The file is not a mapping of exactly ``recipe`` and ``train``, or its
            ``recipe.name`` is not the name it is registered under.
    """
    check_name(RECIPES, name)
    return copy.deepcopy(_read(RECIPES.get(name), name))


@functools.cache
def _read(path: Path, name: str) -> dict[str, dict[str, Any]]:
    """Read and check a recipe file once."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or sorted(data) != sorted(RECIPE_FILE_KEYS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"recipe file {path}: needs exactly the mappings {', '.join(RECIPE_FILE_KEYS)}, "
            f"got {got}"
        )
    for key in RECIPE_FILE_KEYS:
        if not isinstance(data[key], dict):
            raise ConfigError(f"recipe file {path}: '{key}' must be a mapping")
    if data["recipe"].get("name") != name:
        raise ConfigError(
            f"recipe file {path}: recipe.name is '{data['recipe'].get('name')}', but the file "
            f"is registered as recipe '{name}'"
        )
    return data


def recipe_train_defaults(data: Any) -> Any:
    """Put the train block of the recipe file under what the user wrote in ``train`` (a mapping
    holding ``recipe`` and ``train``; anything else is returned as it is)."""
    if isinstance(data, dict):
        recipe = data.get("recipe")
        name = recipe.get("name") if isinstance(recipe, dict) else None
        if isinstance(name, str) and name in RECIPES:
            data = dict(data)
            data["train"] = deep_merge(recipe_file(name)["train"], data.get("train") or {})
    return data
