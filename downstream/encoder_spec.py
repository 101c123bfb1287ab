"""An encoder named by one string, as the command line takes it (``mimbench eval``, ``export``,
``bench-probe``): a checkpoint file of any supported family (:mod:`downstream.checkpoints`),
``random:<preset>`` (a randomly initialized encoder preset), or a timm model name, with or
without a ``timm:`` prefix (its architecture, randomly initialized: nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch

from harness.core.config import ConfigError, EncoderConfig
from pretrain.encoders import Encoder, create_encoder

from .checkpoints import encoder_from_timm_name, load_checkpoint

#: Suffixes of checkpoint files: a spec with one is a path, never a timm model name.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def is_timm_model_name(text: str) -> bool:
    """``timm:<name>``, or a bare timm model name that is not an existing path."""
    if text.startswith("timm:"):
        return True
    if Path(text).exists() or "/" in text or Path(text).suffix in CHECKPOINT_SUFFIXES:
        return False
    return bool(timm.is_model(text))


def encoder_from_spec(spec: str, fmt: str = "auto", allow_partial: bool = False,
                      arch: str | None = None, img_size: int | None = None, seed: int = 0,
                      log: Callable[[str], None] = print) -> Encoder:
    """The encoder ``spec`` names.

    Args:
        spec: A checkpoint path, ``random:<preset>`` or a timm model name.
        fmt: Checkpoint family of a file (``auto``: detected from its keys).
        allow_partial: Load a file whose keys do not all match (they are listed).
        arch: Encoder preset a file fits (default: inferred from its weights).
        img_size: Target resolution (position embeddings of a file are resized).
        seed: Seed of a random initialization.
        log: Where the import report of a file goes.

    Raises:
        ConfigError: A file-only option given with a random or timm encoder.
        CheckpointError: The file is missing or does not fit.
    """
    size = {"img_size": img_size} if img_size else {}
    given = EncoderConfig(arch=arch, **size) if arch else None
    file_only = [f for f, v in (("--arch", arch), ("--format", fmt != "auto"),
                                ("--allow-partial", allow_partial)) if v]  # fmt: skip
    if spec.startswith("random:"):
        if file_only:  # the preset is named in the spec; nothing is read
            raise ConfigError(f"{file_only[0]} applies to checkpoint files, not to '{spec}'")
        torch.manual_seed(seed)
        return create_encoder(EncoderConfig(arch=spec.split(":", 1)[1], **size))
    if is_timm_model_name(spec):
        if file_only or img_size:
            raise ConfigError(f"{(file_only or ['--img-size'])[0]} does not apply to the timm "
                              f"architecture '{spec}' (randomly initialized, nothing is read)")
        torch.manual_seed(seed)
        return encoder_from_timm_name(spec.removeprefix("timm:"))[0]
    enc, report = load_checkpoint(spec, given, fmt, allow_partial, img_size)
    log(report.format())
    return enc
