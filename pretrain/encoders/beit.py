"""The BEiT family: BEiT-style ViTs, so that BEiT and SimMIM-ViT checkpoints can be evaluated.

BEiT (Bao et al., ICLR 2022) and SimMIM's ViT (Xie et al., CVPR 2022, built on BEiT's code)
differ from the plain ViT of :class:`pretrain.encoders.vit.ViTEncoder` in three ways that cannot
be expressed in timm's ``VisionTransformer``:

* relative position bias, per block or shared by all blocks (an additive attention bias that
  depends on the relative offset of two patches), usually with no absolute position embedding;
* layer scale (``gamma_1``, ``gamma_2``): a learned per-channel scale on each residual branch;
* a query and a value bias but no key bias.

Layer scale and the q/v biases could be folded into a plain ViT exactly; the relative position
bias cannot. So imported BEiT-style checkpoints get this family over timm's
:class:`~timm.models.beit.Beit` (whose key names are BEiT's), with BEiT's switches as the
family's options (stored in encoder files as ``beit_options``); ``timm.create_model(
'beit_base_patch16_224', checkpoint_path=..., **kwargs)`` loads a saved one. It shares the ViT
presets (``create_encoder(cfg, 'beit', options)``).

The family also builds the ViT variants with relative position bias for pretraining and every
task: an :class:`EncoderConfig` with ``rel_pos_bias`` set (``per_block`` or ``shared``) names
this family (:attr:`EncoderConfig.family`), and its switches then come from the config
(:func:`options_from_config`), not from ``options``: the absolute position embedding
(``pos_embed``: ``none`` as BEiT and SimMIM's ViT-B pretrain, ``learned``, or ``sincos`` filled in
and frozen) and the layer scale's initial value (``layer_scale``). Such an encoder's state dict is
timm's ``Beit``'s, so it exports as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import timm
import torch
from torch import nn

from harness.core.config import EncoderConfig
from pretrain.encoders.base import Encoder, InitParts, apply_mask_token, register_encoder
from pretrain.encoders.vit import set_sincos_pos_embed

#: timm architecture the family instantiates (every shape value is passed explicitly).
BEIT_TIMM_NAME = "beit_base_patch16_224"
#: The BEiT-specific switches an encoder file stores next to the EncoderConfig.
#: Defaults are BEiT-B's (per-block relative position bias, layer scale, q/v biases).
BEIT_DEFAULT_OPTIONS: dict[str, bool] = {
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": True,
    "use_shared_rel_pos_bias": False,
    "layer_scale": True,
    "qkv_bias": True,
}
BEIT_OPTION_KEYS = tuple(BEIT_DEFAULT_OPTIONS)


def options_from_config(cfg: EncoderConfig) -> dict[str, bool]:
    """The BEiT switches of a ViT variant config (``rel_pos_bias`` set): the bias per block or
    shared, the absolute position embedding unless ``pos_embed: none``, layer scale if
    ``layer_scale`` is set, and BEiT's q / v biases."""
    return {
        "use_abs_pos_emb": cfg.pos_embed != "none",
        "use_rel_pos_bias": cfg.rel_pos_bias == "per_block",
        "use_shared_rel_pos_bias": cfg.rel_pos_bias == "shared",
        "layer_scale": cfg.layer_scale is not None,
        "qkv_bias": True,
    }


def beit_timm_kwargs(cfg: EncoderConfig, options: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model(BEIT_TIMM_NAME, **kwargs)``'s keyword arguments for ``cfg`` + options
    (layer scale starts at ``cfg.layer_scale``, else BEiT-B's 0.1)."""
    o = {**BEIT_DEFAULT_OPTIONS, **options}
    init = cfg.layer_scale if cfg.layer_scale is not None else 0.1
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "num_classes": 0,
        "global_pool": "token",  # keeps the final norm on the tokens (BEiT pretraining)
        "use_abs_pos_emb": bool(o["use_abs_pos_emb"]),
        "use_rel_pos_bias": bool(o["use_rel_pos_bias"]),
        "use_shared_rel_pos_bias": bool(o["use_shared_rel_pos_bias"]),
        # 0.0, not None: timm drops None keyword arguments, so the entry point's 0.1 would stay
        "init_values": init if o["layer_scale"] else 0.0,
        "qkv_bias": bool(o["qkv_bias"]),
    }


@register_encoder
class BeitEncoder(Encoder):
    """timm's BEiT with a mask token.

    Args:
        cfg: Shape of the encoder (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``,
            ``img_size``, ``mlp_ratio``, ``drop_path_rate``); ``arch`` is the nearest preset.
            With ``rel_pos_bias`` set, also the switches (:func:`options_from_config`).
        options: BEiT switches, keys of :data:`BEIT_OPTION_KEYS` (imported checkpoints); with a
            variant config they must be the config's (an encoder file stores both).
    """

    family: ClassVar[str] = "beit"
    num_prefix_tokens: ClassVar[int] = 1
    isotropic: ClassVar[bool] = True
    full_grid_reason: ClassVar[str] = "relative position bias needs the full grid"
    option_defaults: ClassVar[dict[str, bool]] = BEIT_DEFAULT_OPTIONS

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        from_cfg = cfg.rel_pos_bias != "none"
        if from_cfg:
            options = _config_options(cfg, options)
        super().__init__(cfg, options)
        self.beit = timm.create_model(
            BEIT_TIMM_NAME,
            pretrained=False,
            drop_path_rate=cfg.drop_path_rate,
            **beit_timm_kwargs(cfg, self.options),
        )
        self._set_grid(tuple(self.beit.patch_embed.grid_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if from_cfg and cfg.pos_embed == "sincos":
            set_sincos_pos_embed(self.beit.pos_embed, self.grid_size)

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self.beit

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.beit.blocks)

    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        return BEIT_TIMM_NAME, beit_timm_kwargs(self.cfg, self.options)

    def residual_blocks(self) -> list[nn.Module]:
        return list(self.beit.blocks)

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.beit.norm(t)

    def init_parts(self) -> InitParts:
        fixed = self.cfg.rel_pos_bias != "none" and self.cfg.pos_embed == "sincos"
        return InitParts(
            patch_embed=self.beit.patch_embed.proj,
            mask_token=self.mask_token,
            class_token=self.beit.cls_token,
            learned_pos_embed=None if fixed else self.beit.pos_embed,
            residual_out=[(b.attn.proj, b.mlp.fc2) for b in self.beit.blocks],
        )

    def no_weight_decay(self) -> set[str]:
        """Position embedding (if any), class and mask tokens, relative position bias tables and
        layer-scale gammas (BEiT's optimizer leaves out the tables and every 1-D parameter)."""
        params = {f"beit.{n}" for n, _ in self.beit.named_parameters()}
        tables = {n for n in params if "relative_position_bias_table" in n}
        gammas = {n for n in params if n.endswith((".gamma_1", ".gamma_2"))}
        return tables | gammas | ({"beit.pos_embed", "beit.cls_token"} & params) | {"mask_token"}

    def layer_id(self, name: str) -> int:
        """0 = embeddings (and the shared relative position bias), i+1 = block i, L+1 = top
        (as BEiT's ``get_num_layer_for_vit``)."""
        name = name.removeprefix("encoder.")
        if name.startswith(
            (
                "beit.cls_token",
                "beit.pos_embed",
                "beit.patch_embed",
                "beit.rel_pos_bias",
                "mask_token",
            )
        ):
            return 0
        if name.startswith("beit.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ forwards
    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, class token, absolute positions: ``[B, 1 + L, D]``."""
        self._check_input(x)
        t = apply_mask_token(self.beit.patch_embed(x), mask, self.mask_token)  # [B, L, D]
        t = torch.cat([self.beit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        if self.beit.pos_embed is not None:
            t = t + self.beit.pos_embed
        return self.beit.pos_drop(t)

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + L, D]`` after each block, before the final norm."""
        t = self.embed(x, mask)
        rel = self.beit.rel_pos_bias() if self.beit.rel_pos_bias is not None else None
        outs = []
        for blk in self.beit.blocks:
            t = blk(t, shared_rel_pos_bias=rel)
            outs.append(t)
        return outs

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + L, D]``; masked patches see the mask token."""
        return self.beit.norm(self.forward_blocks(x, mask)[-1])


def _config_options(cfg: EncoderConfig, options: Mapping[str, Any] | None) -> dict[str, bool]:
    """The switches of a variant config; given ``options`` (an encoder file's) must agree."""
    derived = options_from_config(cfg)
    given = {**BEIT_DEFAULT_OPTIONS, **options} if options else derived
    bad = {k: (given[k], v) for k, v in derived.items() if bool(given.get(k)) != v}
    if bad:
        raise ValueError(
            f"beit options {bad} (given, from the config) contradict the encoder config "
            f"(pos_embed={cfg.pos_embed}, rel_pos_bias={cfg.rel_pos_bias}, "
            f"layer_scale={cfg.layer_scale}): a variant config sets them; drop the options"
        )
    return derived
