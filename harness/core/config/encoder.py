"""The encoder to pretrain or evaluate: a preset of :data:`ENCODER_PRESETS` plus overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from harness.core.config.base import StrictModel
from harness.core.registry import did_you_mean

#: The encoder-definition fields of a ViT beyond its shape (the variants of BEiT and SimMIM's
#: ViTs), and the value of each that builds the plain ViT.
VARIANT_FIELDS: dict[str, Any] = {"pos_embed": "sincos", "rel_pos_bias": "none", "layer_scale": None}
#: Variant fields added after configs were hashed: left out of dumps at their plain value.
_OMIT_AT_PLAIN = ("rel_pos_bias", "layer_scale")

PosEmbed = Literal["sincos", "learned", "none"]
RelPosBias = Literal["none", "per_block", "shared"]


class EncoderConfig(StrictModel):
    """A ViT encoder: a preset (``arch``) plus optional overrides of its shape, and the ViT
    variant (absolute position embedding, relative position bias, layer scale).

    ``None`` fields take the preset's value from :data:`ENCODER_PRESETS`; the resolved config
    holds the values used.

    Attributes:
        pos_embed: Absolute position embedding: ``sincos`` (fixed 2-D sin-cos, MAE),
            ``learned`` (ViT), ``none`` (BEiT and SimMIM's ViT-B, which use relative position
            bias instead).
        rel_pos_bias: Relative position bias in every attention (Shaw et al. 2018; BEiT Sec.
            2.6): ``none``, ``per_block`` (a table per block), ``shared`` (one table for every
            block, BEiT pretraining and SimMIM's ViT-B). A ViT with it is built on timm's
            ``Beit`` (family ``beit``), whose visible-only forward does not exist (the bias is
            defined over the full grid).
        layer_scale: Initial value of a learned per-channel scale on every residual branch
            (CaiT, Touvron et al. 2021; BEiT-B: 0.1), or ``None`` for none.
        drop_path_rate: Stochastic depth.

    ``rel_pos_bias`` and ``layer_scale`` are left out of dumps at their plain values (``none``,
    ``None``), so configs hashed before they existed keep their hashes; they apply to the ViT
    presets only.
    """

    arch: str = "vit_tiny_32"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pos_embed: PosEmbed = "sincos"
    rel_pos_bias: RelPosBias = "none"
    layer_scale: float | None = Field(None, gt=0.0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_serializer(mode="wrap")
    def _omit_plain_variant(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and stages were hashed: left out at the plain ViT's values
        out = handler(self)
        for key in _OMIT_AT_PLAIN:
            if getattr(self, key) == VARIANT_FIELDS[key]:
                out.pop(key, None)
        return out

    @property
    def is_variant(self) -> bool:
        """Whether relative position bias or layer scale is on (not the plain ViT)."""
        return any(getattr(self, k) != VARIANT_FIELDS[k] for k in _OMIT_AT_PLAIN)

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
        if self.is_variant and preset.get("family", "vit") != "vit":
            raise ValueError(
                f"rel_pos_bias / layer_scale are ViT variants; '{self.arch}' is a "
                f"{preset.get('family')} preset: remove them or pick a ViT arch"
            )
        return self

    @property
    def timm_name(self) -> str:
        """The timm model name whose architecture this encoder instantiates (with overrides)."""
        return str(ENCODER_PRESETS[self.arch].get("timm_name") or "")

    @property
    def family(self) -> str:
        """``vit``, ``swin``, ``swinv2`` or ``conv`` (the Context Encoder's, not a timm model): the
        family in :data:`pretrain.encoders.base.ENCODERS` that builds this preset; a ViT preset
        with relative position bias is built by ``beit`` (timm's ``Beit`` has the bias)."""
        family = str(ENCODER_PRESETS[self.arch].get("family", "vit"))
        return "beit" if family == "vit" and self.rel_pos_bias != "none" else family

    @property
    def is_hierarchical(self) -> bool:
        """Whether the preset is built in stages (Swin, SwinV2: ``stage_depths`` in the preset)."""
        return "stage_depths" in ENCODER_PRESETS[self.arch]

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, **kwargs)``.

        For the hierarchical presets (Swin, SwinV2: :attr:`is_hierarchical`), ``depth`` and
        ``num_heads`` are the totals of the preset's stages: the stage depths, stage heads and
        window size come from the preset (``stage_depths``, ``stage_heads``, ``window_size``).
        """
        preset = ENCODER_PRESETS[self.arch]
        if self.is_hierarchical:
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
        if self.family in ("conv", "igpt"):
            return {}
        out: dict[str, Any] = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": 0,
        }
        if self.layer_scale is not None:  # timm's LayerScale (ls1 / ls2 .gamma)
            out["init_values"] = self.layer_scale
        if self.pos_embed == "none":
            out["pos_embed"] = "none"
        return out


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
    # SwinV2 (Liu et al., CVPR 2022: residual post-norm, cosine attention, log-spaced continuous
    # position bias), the encoder of SimMIM's largest runs. swinv2_base_192: the Swin repo's
    # configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml (embed 128, depths
    # 2-2-18-2, heads 4-8-16-32, window 12, 192 px); swinv2_tiny_256: timm's
    # swinv2_tiny_window8_256 (configs/swinv2/swinv2_tiny_patch4_window8_256.yaml).
    "swinv2_micro_32": dict(timm_name="swinv2_tiny_window8_256", family="swinv2", img_size=32,
                            patch_size=4, embed_dim=16, depth=3, num_heads=1, mlp_ratio=2.0,
                            stage_depths=(1, 1, 1), stage_heads=(1, 2, 4), window_size=4),
    "swinv2_tiny_256": dict(timm_name="swinv2_tiny_window8_256", family="swinv2", img_size=256,
                            patch_size=4, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0,
                            stage_depths=(2, 2, 6, 2), stage_heads=(3, 6, 12, 24), window_size=8),
    "swinv2_base_192": dict(timm_name="swinv2_base_window12_192", family="swinv2", img_size=192,
                            patch_size=4, embed_dim=128, depth=24, num_heads=4, mlp_ratio=4.0,
                            stage_depths=(2, 2, 18, 2), stage_heads=(4, 8, 16, 32), window_size=12),
    # SwinV2-H: embed 352, depths 2-2-18-2, heads 11-22-44-88 as timm's swin_transformer_v2_cr.py
    # swinv2_cr_huge_* (whose comment says the head count is not certain; 11 keeps SwinV2's 32
    # channels a head); the width and depths give 655.2M backbone parameters, the Swin repo's
    # MODELHUB.md "SimMIM Pretrained Swin-V2 Models" SwinV2-Huge 655M. 192 px and window 12 are
    # the harness's choice, following swinv2_base_192's SimMIM pretraining config.
    "swinv2_huge_192": dict(timm_name="swinv2_base_window12_192", family="swinv2", img_size=192,
                            patch_size=4, embed_dim=352, depth=24, num_heads=11, mlp_ratio=4.0,
                            stage_depths=(2, 2, 18, 2), stage_heads=(11, 22, 44, 88), window_size=12),
    # Context Encoder's convolutional encoder (Pathak et al. 2016): ``depth`` stride-2 4x4 convs
    # ending at ``embed_dim`` channels; ``patch_size`` is the masking unit in pixels.
    "ce_conv_32": dict(family="conv", img_size=32, patch_size=4, embed_dim=64, depth=3,
                       num_heads=1, mlp_ratio=1.0),
    "ce_conv_128": dict(family="conv", img_size=128, patch_size=8, embed_dim=512, depth=5,
                        num_heads=1, mlp_ratio=1.0),
    # iGPT (Chen et al., ICML 2020): one token per pixel of a ``vocab_size``-entry colour-cluster
    # codebook; iGPT-S as openai/image-gpt src/run.py's defaults (n_embd 512, n_head 8, n_layer
    # 24, n_px 32, n_vocab 512); iGPT-M and iGPT-L as the repo's README runs them ("--n_embd 1024
    # --n_head 8 --n_layer 36", "--n_embd 1536 --n_head 16 --n_layer 48"); img_size is the input
    # resolution (the paper's 32, 48 or 64). Tiny ones for CPU tests and the demo.
    "igpt_micro_8": dict(family="igpt", img_size=8, patch_size=1, embed_dim=32, depth=2,
                         num_heads=2, mlp_ratio=4.0, vocab_size=512),
    "igpt_tiny_16": dict(family="igpt", img_size=16, patch_size=1, embed_dim=128, depth=6,
                         num_heads=4, mlp_ratio=4.0, vocab_size=512),
    "igpt_s_32": dict(family="igpt", img_size=32, patch_size=1, embed_dim=512, depth=24,
                      num_heads=8, mlp_ratio=4.0, vocab_size=512),
    "igpt_m_32": dict(family="igpt", img_size=32, patch_size=1, embed_dim=1024, depth=36,
                      num_heads=8, mlp_ratio=4.0, vocab_size=512),
    "igpt_l_32": dict(family="igpt", img_size=32, patch_size=1, embed_dim=1536, depth=48,
                      num_heads=16, mlp_ratio=4.0, vocab_size=512),
}

