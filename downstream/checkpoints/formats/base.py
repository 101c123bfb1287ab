"""The checkpoint-format interface and its registry.

A format is one class: its ``name`` (the value of ``--format`` and of a suite encoder's
``format:``), how a file of it is recognised (:meth:`CheckpointFormat.detect`, tried in
``detect_rank`` order), how its keys map onto one of our encoder wrappers
(:meth:`CheckpointFormat.convert`) and what it assumes (its docstring). Decorating the class with
:func:`register_format` adds it to :data:`harness.core.config.CHECKPOINT_FORMATS`, the one list of
format names the config validates, the CLI lists and the loader dispatches on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from downstream.checkpoints.report import ImportReport
from harness.core.config import CHECKPOINT_FORMATS, checkpoint_format_names
from harness.core.errors import CheckpointError
from harness.core.registry import did_you_mean

#: ``(wrapper, state dict in its timm keys)``: the wrapper is an encoder family (``vit``,
#: ``beit``, ``swin``, ``swinv2``, ...).
Converted = tuple[str, dict[str, torch.Tensor]]


class CheckpointFormat:
    """One family of checkpoint files (a subclass per format; see :func:`register_format`)."""

    #: The format's name (``--format NAME``).
    name: ClassVar[str]
    #: Auto-detection tries the formats by rank, lowest first: a layout whose keys contain
    #: another's (SimMIM's ``encoder.`` around a BEiT, mmpretrain's ``backbone.``) ranks first.
    detect_rank: ClassVar[int]

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        """Whether a file with this state dict, our metadata (or None) and container key is of
        this format."""
        raise NotImplementedError

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        """This format's keys -> ``(wrapper, its timm keys)``; what is not the encoder goes to
        ``report.dropped``, an encoder-side mask token under ``keys.MASK_TOKEN``."""
        raise NotImplementedError

    def recorded_meta(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        """The metadata that records the file's architecture (our own files); None where the
        architecture must be read from the weights."""
        return None

    def check_source(self, path: Path, meta: dict[str, Any] | None, detected: str | None) -> None:
        """Refuse a file that cannot be of this format, before anything is converted.

        Raises:
            CheckpointError: saying which ``--format`` to use instead.
        """


F = TypeVar("F", bound=type[CheckpointFormat])


def register_format(cls: F) -> F:
    """Class decorator: register (an instance of) a checkpoint format under ``cls.name``."""
    CHECKPOINT_FORMATS.register(cls.name, cls())
    return cls


def checkpoint_format(name: str) -> CheckpointFormat:
    """The registered format ``name``.

    Raises:
        CheckpointError: for an unknown name, with a did-you-mean and the known formats.
    """
    if name not in CHECKPOINT_FORMATS:
        known = list(checkpoint_format_names())
        raise CheckpointError(
            f"unknown --format '{name}';{did_you_mean(name, known)} known: {', '.join(known)}"
        )
    fmt: CheckpointFormat = CHECKPOINT_FORMATS.get(name)
    return fmt


def detection_order() -> list[CheckpointFormat]:
    """Every registered format in the order auto-detection tries them."""
    formats: list[CheckpointFormat] = [CHECKPOINT_FORMATS.get(n) for n in CHECKPOINT_FORMATS]
    return sorted(formats, key=lambda f: f.detect_rank)


def detect_family(
    state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None, container: str | None = None
) -> str | None:
    """The checkpoint format of a file from its keys and metadata (None when nothing matches)."""
    for fmt in detection_order():
        if fmt.detect(state, meta, container):
            return fmt.name
    return None
