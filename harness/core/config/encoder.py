"""The encoder to pretrain or evaluate: a preset of :data:`ENCODER_PRESETS` plus overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from harness.core.config.base import StrictModel
from harness.core.registry import did_you_mean


class EncoderConfig(StrictModel):
    """A ViT encoder: a preset (``arch``) plus optional overrides of its shape.

    ``None`` fields take the preset's value from :data:`ENCODER_PRESETS`; the resolved config
    holds the values used.
    """

    arch: str = "vit_tiny_32"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pos_embed: Literal["sincos", "learned"] = "sincos"
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> EncoderConfig:
        if self.arch not in ENCODER_PRESETS:
            hint = did_you_mean(self.arch, list(ENCODER_PRESETS))
            raise ValueError(
                f"unknown encoder arch '{self.arch}';{hint} known: {', '.join(ENCODER_PRESETS)}"
            )
        preset = ENCODER_PRESETS[self.arch]
        for key, value in preset.items():
            # architecture-only preset keys (timm_name, family, Swin's stages) are not fields
            if key in type(self).model_fields and getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.img_size % self.patch_size:  # type: ignore[operator]
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:  # type: ignore[operator]
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def timm_name(self) -> str:
        """The timm model name whose architecture this encoder instantiates (with overrides)."""
        return str(ENCODER_PRESETS[self.arch].get("timm_name") or "")

    @property
    def family(self) -> str:
        """``vit``, ``swin`` or ``conv`` (the Context Encoder's, not a timm model): the
        family in :data:`pretrain.encoders.base.ENCODERS` that builds this preset."""
        return str(ENCODER_PRESETS[self.arch].get("family", "vit"))

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, **kwargs)``.

        For Swin, ``depth`` and ``num_heads`` are the totals of the preset's stages: the stage
        depths, stage heads and window size come from the preset (``stage_depths``,
        ``stage_heads``, ``window_size``).
        """
        preset = ENCODER_PRESETS[self.arch]
        if self.family == "swin":
            return {
                "img_size": self.img_size,
                "patch_size": self.patch_size,
                "embed_dim": self.embed_dim,
                "depths": tuple(preset["stage_depths"]),
                "num_heads": tuple(preset["stage_heads"]),
                "window_size": preset["window_size"],
                "mlp_ratio": self.mlp_ratio,
                "num_classes": 0,
            }
        if self.family == "conv":
            return {}
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": 0,
        }


# Encoder presets: tiny ones for CPU (tests, the demo), the standard ViTs for GPUs.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "vit_micro_32": dict(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                         embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "vit_tiny_32": dict(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=4,
                        embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    "vit_tiny_16": dict(timm_name="vit_tiny_patch16_224", img_size=224, patch_size=16,
                        embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small_16": dict(timm_name="vit_small_patch16_224", img_size=224, patch_size=16,
                         embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base_16": dict(timm_name="vit_base_patch16_224", img_size=224, patch_size=16,
                        embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large_16": dict(timm_name="vit_large_patch16_224", img_size=224, patch_size=16,
                         embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    # Swin (Liu et al. 2021) as SimMIM pretrains it: 192 px, window 6, patch 4, stride 32.
    # ``depth``/``num_heads`` are the first stage's totals for the schema; the stages are below.
    "swin_micro_32": dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=32,
                          patch_size=4, embed_dim=16, depth=3, num_heads=1, mlp_ratio=2.0,
                          stage_depths=(1, 1, 1), stage_heads=(1, 2, 4), window_size=4),
    "swin_tiny_192": dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=192,
                          patch_size=4, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0,
                          stage_depths=(2, 2, 6, 2), stage_heads=(3, 6, 12, 24), window_size=6),
    "swin_base_192": dict(timm_name="swin_base_patch4_window7_224", family="swin", img_size=192,
                          patch_size=4, embed_dim=128, depth=24, num_heads=4, mlp_ratio=4.0,
                          stage_depths=(2, 2, 18, 2), stage_heads=(4, 8, 16, 32), window_size=6),
    # Context Encoder's convolutional encoder (Pathak et al. 2016): ``depth`` stride-2 4x4 convs
    # ending at ``embed_dim`` channels; ``patch_size`` is the masking unit in pixels.
    "ce_conv_32": dict(family="conv", img_size=32, patch_size=4, embed_dim=64, depth=3,
                       num_heads=1, mlp_ratio=1.0),
    "ce_conv_128": dict(family="conv", img_size=128, patch_size=8, embed_dim=512, depth=5,
                        num_heads=1, mlp_ratio=1.0),
}

