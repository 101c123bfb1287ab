"""ViT layouts of published checkpoints that the plain ViT (:mod:`.vit`) cannot hold, so that
they can be imported and evaluated by every task.

Two families, both timm's :class:`~timm.models.vision_transformer.VisionTransformer` (so their
state dicts keep timm's key names) with the embedding and block order of the release:

* ``vit_postnorm``: data2vec 2.0's image encoder (Baevski et al., ICML 2023; fairseq
  ``examples/data2vec/models/modalities/images.py`` and ``modules.py``, ``AltBlock`` with
  ``layer_norm_first=False``): fixed position embedding on the patches only, the class token
  (its ``extra_tokens``) prepended without a position, a LayerNorm before the blocks (the
  context encoder's ``norm``), post-norm blocks (``x = norm1(x + attn(x))``, ``x = norm2(x +
  mlp(x))``) and no final norm; its per-block outputs are already normed. Every LayerNorm has
  eps 1e-6 (``data2vec2.py``: ``make_layer_norm`` is ``nn.LayerNorm(eps=cfg.norm_eps)``, default
  and ``config/v2/base_images_only_task.yaml`` ``norm_eps: 1e-6``; timm's ViT norms are 1e-6 too),
  and the final ``self.norm`` exists only when ``layer_norm_first`` (default False; the
  modality's ``BlockEncoder`` norm then runs before the blocks instead, ``modules.py``). CAPI's
  ``baselines/data2vec2_loader.py`` builds the same layout in timm (``pre_norm=True,
  final_norm=False``, post-norm blocks).
* ``vit_avgpool``: a ViT without a class token, pooled by averaging its output tokens (I-JEPA,
  Assran et al., CVPR 2023; facebookresearch/ijepa ``src/models/vision_transformer.py``):
  position embedding over the patches, pre-norm blocks and the final norm.

Both read their switches (``norm_pre``: a LayerNorm before the blocks; ``final_norm``: the norm
after them) as family options, stored in encoder files as ``<family>_options``; the imported
weights set them (:func:`options_from_keys`). ``vit_avgpool`` rebuilds in timm
(``class_token=False, global_pool='avg', fc_norm=False``); timm has no post-norm ViT block, so a
``vit_postnorm`` export names no timm architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from harness.core.config import EncoderConfig
from pretrain.encoders.base import Encoder, apply_mask_token, register_encoder

#: The families of this module (the import target of their checkpoint formats).
RELEASED_FAMILIES = ("vit_postnorm", "vit_avgpool")


class PostNormBlock(Block):
    """timm's ViT block with the norms after each residual sum (the original Transformer's
    order; data2vec 2.0's ``AltBlock`` with ``layer_norm_first=False``). Same parameters and
    key names as :class:`~timm.models.vision_transformer.Block`."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask))))
        return self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))  # [B, T, D]


def options_from_keys(state: Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """The switches of timm-keyed weights of a released layout: which norms exist."""
    return {"norm_pre": "norm_pre.weight" in state, "final_norm": "norm.weight" in state}


class _ReleasedViT(Encoder):
    """A timm ViT built in a release's layout (see the module docstring); import-only: it has
    no visible-only forward and no initialisation rule.

    Args:
        cfg: Encoder config (the shape; ``pos_embed`` ``none`` drops the position embedding).
        options: ``norm_pre`` / ``final_norm`` (:func:`options_from_keys`).
    """

    isotropic: ClassVar[bool] = True
    full_grid_reason: ClassVar[str] = "it is an imported release's layout"
    #: Post-norm blocks (True) or timm's pre-norm blocks.
    post_norm: ClassVar[bool]

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        self.vit = VisionTransformer(**self._timm_kwargs(), block_fn=self._block_fn())
        if self.options["norm_pre"]:  # timm's pre_norm would also drop the patch bias
            # eps 1e-6: data2vec 2.0's norm_eps (data2vec2.py make_layer_norm)
            self.vit.norm_pre = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self._set_grid(tuple(self.vit.patch_embed.grid_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def _block_fn(self) -> type[nn.Module]:
        return PostNormBlock if self.post_norm else Block

    def _timm_kwargs(self) -> dict[str, Any]:
        """``VisionTransformer`` keyword arguments: the shape, the class token (without a
        position of its own), the pooling and the final norm."""
        c = self.cfg
        cls = self.num_prefix_tokens > 0
        kwargs: dict[str, Any] = {
            "img_size": c.img_size,
            "patch_size": c.patch_size,
            "embed_dim": c.embed_dim,
            "depth": c.depth,
            "num_heads": c.num_heads,
            "mlp_ratio": c.mlp_ratio,
            "num_classes": 0,
            "class_token": cls,
            "no_embed_class": cls,
            "global_pool": "token" if cls else "avg",
            "fc_norm": False,
            "final_norm": self.options["final_norm"],
            "drop_path_rate": c.drop_path_rate,
        }
        if c.pos_embed == "none":
            kwargs["pos_embed"] = "none"
        return kwargs

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self.vit

    @property
    def num_layers(self) -> int:
        return len(self.vit.blocks)

    def residual_blocks(self) -> list[nn.Module]:
        return list(self.vit.blocks)

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(t)

    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters()}
        return {"vit.pos_embed", "vit.cls_token", "mask_token"} & names

    def layer_id(self, name: str) -> int:
        """0 = embeddings (and the norm before the blocks), i+1 = block i, L+1 = top."""
        name = name.removeprefix("encoder.")
        if name.startswith(
            ("vit.cls_token", "vit.pos_embed", "vit.patch_embed", "vit.norm_pre", "mask_token")
        ):
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ forwards
    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, positions on the patches, class token (if any, without
        a position), the norm before the blocks: ``[B, P + L, D]``."""
        self._check_input(x)
        t = apply_mask_token(self.vit.patch_embed(x), mask, self.mask_token)  # [B, L, D]
        if self.vit.pos_embed is not None:
            t = t + self.vit.pos_embed  # [1, L, D]: the patches' positions only
        if self.vit.cls_token is not None:
            t = torch.cat([self.vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.vit.norm_pre(t)

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, P + L, D]`` after each block, before the final norm."""
        t = self.embed(x, mask)
        outs = []
        for blk in self.vit.blocks:
            t = blk(t)
            outs.append(t)
        return outs

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm (if any), ``[B, P + L, D]``."""
        return self.vit.norm(self.vit.blocks(self.embed(x, mask)))


@register_encoder
class PostNormViTEncoder(_ReleasedViT):
    """data2vec 2.0's layout: class token without position, norm before post-norm blocks."""

    family: ClassVar[str] = "vit_postnorm"
    num_prefix_tokens: ClassVar[int] = 1
    post_norm: ClassVar[bool] = True
    option_defaults: ClassVar[dict[str, bool]] = {"norm_pre": True, "final_norm": False}

    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        return "", {}  # timm has no post-norm ViT block


@register_encoder
class AvgPoolViTEncoder(_ReleasedViT):
    """I-JEPA's layout: no class token (average pooling), pre-norm blocks, final norm."""

    family: ClassVar[str] = "vit_avgpool"
    num_prefix_tokens: ClassVar[int] = 0
    post_norm: ClassVar[bool] = False
    option_defaults: ClassVar[dict[str, bool]] = {"norm_pre": False, "final_norm": True}

    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        kwargs = {k: v for k, v in self._timm_kwargs().items() if k != "drop_path_rate"}
        return self.cfg.timm_name, kwargs
