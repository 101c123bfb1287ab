"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

SimMIM keeps the encoder on the full token sequence: masked patches are replaced by a learned
mask token at the patch embedding (:meth:`pretrain.encoders.vit.ViTEncoder.forward_features`, and
:class:`pretrain.encoders.swin.SwinEncoder` for the paper's main Swin-B setting), and a one-layer
prediction head maps every output token back to its pixels: a 1x1 convolution to
``stride^2 * 3`` channels followed by a pixel shuffle of the encoder stride (Sec. 3.3, "linear
head", Table 2). The loss is L1 on the masked pixels only (Sec. 3.4, Tables 4 and 5).

Paper defaults (its recipe file, ``pretrain/recipes/simmim.yaml``): random masking of 32 px units on
16 px patches at ratio 0.6 (Table 1), AdamW with base lr 8e-4 at batch 2048 scaled per 512,
weight decay 0.05, 100 epochs with 10 warmup, crops of scale [0.67, 1]. The ablation axes of
Tables 1-5 and 13 (masking, head, prediction resolution, loss region, target and loss, colour
bins x resolution) are config values; see ``configs/sweeps/``.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.core.config import HeadConfig
from pretrain.heads import HEADS, Head, map_to_patches, tokens_to_map, upsample_factor


@HEADS.register("linear")
class LinearPixelShuffleHead(Head):
    """SimMIM's linear head: 1x1 conv, then a pixel shuffle from the encoder grid to the patch grid.

    The conv maps each output token to ``r^2 * out_dim`` values, ``r = encoder_stride /
    patch_size`` (1 for a ViT, 8 for Swin with 4 px patches), and the shuffle hands each of the
    ``r x r`` patches under the token its ``out_dim`` predictions. For pixel targets this is the
    paper's ``Conv2d(C, stride^2 * 3, 1) + PixelShuffle(stride)`` with its output channels in
    another order (the same linear map up to a permutation).

    Args:
        encoder: The encoder whose tokens it reads (width, stride, grid, prefix tokens).
        cfg: Head config (unused fields ignored: the head is one layer by design).
        out_dim: Predictions per cell of the prediction grid (``p*p*3`` for pixels).
        pixel_channels: Unused.
        pred_grid: The target's prediction grid (None: the patch grid). At a lower target
            resolution (SimMIM Table 3) the shuffle goes from the encoder's grid to that grid:
            for Swin-B at 192 px and a ``k x k`` target, a 1x1 conv to ``(k/6)^2 * 3`` channels
            and a pixel shuffle of ``k/6`` (``k >= 48``: to the 48x48 patch grid with
            ``(k/48)^2 * 3`` values per patch, the same map in another order).
    """

    requires_full_sequence = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        r = upsample_factor(encoder, pred_grid)
        self.prefix, self.grid = int(encoder.num_prefix_tokens), tuple(encoder.feature_grid)
        self.proj = nn.Conv2d(encoder.num_features, out_dim * r * r, kernel_size=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict every patch.

        Args:
            tokens: Encoder output ``[B, P + h*w, C]`` (P prefix tokens).
            mask: ``[B, L]`` (unused: every position is predicted, the loss picks).
            ids_restore: Unused.

        Returns:
            ``[B, L', out_dim]``, row-major over the prediction grid.
        """
        x = tokens_to_map(tokens, self.prefix, self.grid)  # [B, C, h, w]
        x = self.shuffle(self.proj(x))  # [B, out_dim, gh, gw]
        return map_to_patches(x)  # [B, L, out_dim]
