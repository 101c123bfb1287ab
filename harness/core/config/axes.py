"""The registries behind a recipe's axes: recipe files, masking strategies, heads, targets,
tokenizers, losses, encoder initialisations and encoder families.

This layer only holds the registries; :mod:`pretrain` fills them (importing the package
registers every recipe file and every part), as :mod:`downstream` fills
:data:`harness.core.config.tasks.TASK_CONFIGS`. So the names a config may use are the names
that code exists for, one source of truth, and whoever validates a recipe imports
:mod:`pretrain` first (the CLI, the runner and the tests do, through :mod:`downstream`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
#: Encoder family (``EncoderConfig.family``) -> encoder class (:mod:`pretrain.encoders`), whose
#: class attributes (``isotropic``, ``num_prefix_tokens``) config validation reads as it reads a
#: target's ``needs_teacher``.
ENCODER_FAMILIES: Registry[Any] = Registry("encoder")


@dataclass(frozen=True)
class EncoderInitRule:
    """An encoder initialisation (``recipe.encoder_init``): a function of the freshly built
    encoder and the families it is defined for, so a config naming it for another family is
    refused at validation.

    Attributes:
        apply: Initialises the encoder in place.
        families: Encoder families the rule is written for (``None``: every family).
        source: The reference it follows (paper, file and function), for messages and records.
    """

    apply: Callable[[Any], None]
    families: tuple[str, ...] | None
    source: str

    def check_family(self, name: str, family: str) -> None:
        """Raise :class:`ValueError` if the rule has no definition for ``family``."""
        if self.families is not None and family not in self.families:
            raise ValueError(
                f"encoder_init '{name}' ({self.source}) is defined for {', '.join(self.families)} "
                f"encoders, not a {family} encoder: use encoder_init: timm (the family's own)"
            )


#: ``recipe.encoder_init`` -> :class:`EncoderInitRule` of a freshly built encoder
#: (:mod:`pretrain.inits`).
ENCODER_INITS: Registry[EncoderInitRule] = Registry("encoder initialisation")


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
