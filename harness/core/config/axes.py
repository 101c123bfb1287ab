"""The registries behind a recipe's axes: recipe files, masking strategies, heads, targets,
tokenizers, losses and encoder initialisations.

This layer only holds the registries; :mod:`pretrain` fills them (importing the package
registers every recipe file and every part), as :mod:`downstream` fills
:data:`harness.core.config.tasks.TASK_CONFIGS`. So the names a config may use are the names
that code exists for, one source of truth, and whoever validates a recipe imports
:mod:`pretrain` first (the CLI, the runner and the tests do, through :mod:`downstream`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.registry import Registry, did_you_mean

#: Recipe name -> its recipe file (every recipe and train key, citing the paper).
RECIPES: Registry[Path] = Registry("recipe")
#: ``recipe.masking.strategy`` -> masker class (:mod:`pretrain.masking`).
MASKERS: Registry[Any] = Registry("masking strategy")
#: ``recipe.head.type`` -> head class (:mod:`pretrain.heads`).
HEADS: Registry[Any] = Registry("head")
#: ``recipe.target.type`` -> target class (:mod:`pretrain.targets`).
TARGETS: Registry[Any] = Registry("target")
#: ``recipe.target.tokenizer.type`` -> tokenizer class (:mod:`pretrain.tokenizers`).
TOKENIZERS: Registry[Any] = Registry("tokenizer")
#: ``recipe.loss.type`` -> loss (:mod:`pretrain.losses`).
LOSSES: Registry[Any] = Registry("loss")
#: ``recipe.encoder_init`` -> initialisation of a freshly built encoder (:mod:`pretrain.model`).
ENCODER_INITS: Registry[Any] = Registry("encoder initialisation")


def check_name(registry: Registry[Any], value: str) -> str:
    """``value`` if ``registry`` holds it, else a :class:`ValueError` with a did-you-mean.

    Args:
        registry: The registry of the axis (its ``kind`` names it in the message).
        value: The name a config gives.

    Raises:
        ValueError: The name is unknown (the message lists the known ones), or nothing is
            registered because :mod:`pretrain` was not imported.
    """
    names = registry.names()
    if not names:
        raise ValueError(
            f"no {registry.kind} is registered: import pretrain (it registers every recipe and "
            f"part) before validating a recipe ('{value}')"
        )
    if value not in registry:
        hint = did_you_mean(str(value), names)
        raise ValueError(f"unknown {registry.kind} '{value}';{hint} known: {', '.join(names)}")
    return value
