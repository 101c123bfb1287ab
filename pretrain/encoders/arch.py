"""What an :class:`~harness.core.config.EncoderConfig` builds, as records name it, and the check
that a checkpoint's recorded architecture is the one the user named (every encoder family)."""

from __future__ import annotations

import math
from typing import Any

from harness.core.config import ENCODER_PRESETS, EncoderConfig
from harness.core.config.encoder import VARIANT_FIELDS
from harness.core.errors import CheckpointError

#: The shape fields of an :class:`EncoderConfig` (with the family and, for Swin, the preset's
#: stages and window): two configs that agree on them build the same network.
ARCH_FIELDS: tuple[str, ...] = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def architecture(cfg: EncoderConfig) -> dict[str, Any]:
    """The architecture ``cfg`` builds: family, shape fields and (Swin) stages and window."""
    out: dict[str, Any] = {"family": cfg.family}
    out.update({k: getattr(cfg, k) for k in ARCH_FIELDS})
    preset = ENCODER_PRESETS[cfg.arch]
    if "stage_depths" in preset:  # hierarchical presets (Swin): their stages are the shape too
        out.update(
            stage_depths=tuple(preset["stage_depths"]),
            stage_heads=tuple(preset["stage_heads"]),
            window_size=preset["window_size"],
        )
    return out


def arch_label(cfg: EncoderConfig) -> str:
    """What a record calls the architecture: the preset, plus every value that differs from it.

    ``vit_tiny_32`` for the preset itself, ``vit_tiny_32(num_heads=2, img_size=48)`` otherwise;
    a variant adds its definition: ``vit_base_16(pos_embed=none, rel_pos_bias=shared,
    layer_scale=0.1)``.
    """
    preset = ENCODER_PRESETS[cfg.arch]
    diffs = [
        f"{k}={getattr(cfg, k)}"
        for k in (*ARCH_FIELDS, "img_size")
        if k in preset and getattr(cfg, k) != preset[k]
    ]
    if cfg.is_variant:  # BEiT-style ViT variants name their definition
        diffs += [f"{k}={getattr(cfg, k)}" for k in VARIANT_FIELDS]
    return f"{cfg.arch}({', '.join(diffs)})" if diffs else cfg.arch


def check_architecture(
    named: EncoderConfig, recorded: EncoderConfig, source: str, img_size: bool = False
) -> None:
    """Refuse a checkpoint whose recorded architecture is not the one the user named.

    Args:
        named: The encoder config the user gave (``--arch``, a suite's ``encoder:``).
        recorded: The config the checkpoint's metadata holds (what it was trained as).
        source: The checkpoint, for the message.
        img_size: Also require the same image size (loaders that cannot resize).

    Raises:
        CheckpointError: naming every differing value of both.
    """
    a, b = architecture(named), architecture(recorded)
    fields = list(a) + (["img_size"] if img_size else [])
    a["img_size"], b["img_size"] = named.img_size, recorded.img_size
    bad = [
        f"{k}: checkpoint {b.get(k)} vs named {a.get(k)}"
        for k in fields
        if not _same(a.get(k), b.get(k))
    ]
    if bad:
        raise CheckpointError(
            f"{source} holds a {arch_label(recorded)} encoder (its metadata), not the named "
            f"{arch_label(named)}: " + "; ".join(bad) + ". Fix: drop --arch (or the suite "
            "entry's 'encoder:') to use the architecture the file records, or name that one"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return bool(a == b)
