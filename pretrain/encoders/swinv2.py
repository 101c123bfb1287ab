"""The SwinV2 family (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution",
CVPR 2022): the encoder of SimMIM's largest runs.

timm's :class:`~timm.models.swin_transformer_v2.SwinTransformerV2` behind the encoder contract,
the same wrapper as :class:`~pretrain.encoders.swin.SwinEncoder` (timm 1.0 gives both the same
layout: channels-last patch embedding, stages that merge patches at their start, a final norm).
What SwinV2 changes and this family accounts for:

* residual post-norm: each block normalises its branch output (``x + norm1(attn(x))``), and the
  reference initialises those norms to zero (the Swin repo's models/swin_transformer_v2.py
  ``BasicLayer._init_respostnorm``, called after ``_init_weights``), so an init rule that resets
  LayerNorms must zero them again: they are :attr:`InitParts.post_norms`;
* cosine attention with a learned ``logit_scale`` and a continuous position bias from a small MLP
  (``cpb_mlp``) instead of bias tables: neither is weight-decayed, as the reference's
  ``no_weight_decay_keywords`` ({cpb_mlp, logit_scale, relative_position_bias_table}) and
  SimMIM's ``SwinTransformerV2ForSimMIM`` (the mask token too) say.

SimMIM's SwinV2 setting: ``encoder.arch: swinv2_base_192`` (SwinV2-B, 192 px, window 12: the Swin
repo's configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml).
"""

from __future__ import annotations

from typing import ClassVar

from pretrain.encoders.base import InitParts, register_encoder
from pretrain.encoders.swin import SwinEncoder


@register_encoder
class SwinV2Encoder(SwinEncoder):
    """A timm SwinV2 with a mask token at the patch embedding.

    Args:
        cfg: Encoder config of a ``family: swinv2`` preset.
        options: None (the family has no options).
    """

    family: ClassVar[str] = "swinv2"
    full_grid_reason: ClassVar[str] = "SwinV2's window attention needs every patch"
    no_decay_keywords: ClassVar[tuple[str, ...]] = (
        "cpb_mlp",
        "logit_scale",
        "relative_position_bias_table",
    )

    def init_parts(self) -> InitParts:
        """Swin's parts, plus every block's two residual post-norms (zeroed after an init)."""
        parts = super().init_parts()
        parts.post_norms = [n for b in self.residual_blocks() for n in (b.norm1, b.norm2)]
        return parts
