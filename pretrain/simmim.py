"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

SimMIM keeps the encoder on the full token sequence: masked patches are replaced by a learned
mask token at the patch embedding (:meth:`pretrain.encoder.ViTEncoder.forward_features`), and a
one-layer prediction head maps every token back to its pixels: a 1x1 convolution to
``stride^2 * 3`` channels followed by a pixel shuffle of the encoder stride (Sec. 3.3, "linear
head"). The loss is L1 on the masked pixels only (Sec. 3.4, Table 5).

Paper defaults (see :data:`harness.config.RECIPE_DEFAULTS`): random masking of 32 px units on
16 px patches at ratio 0.6 (Table 1), AdamW with base lr 8e-4 at batch 2048 scaled per 512,
weight decay 0.05, 100 epochs with 10 warmup, crops of scale [0.67, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from harness.config import HeadConfig
from pretrain.encoder import ViTEncoder


class LinearPixelShuffleHead(nn.Module):
    """SimMIM's linear head: 1x1 conv to ``stride^2 * C`` channels, then pixel shuffle.

    Args:
        encoder: The encoder whose tokens it reads (for width, stride and grid).
        cfg: Head config (unused fields ignored: the head is one layer by design).
        out_chans: Channels of the predicted image.
    """

    def __init__(self, encoder: ViTEncoder, cfg: HeadConfig, out_chans: int = 3) -> None:
        super().__init__()
        self.encoder_stride = encoder.patch_size
        self.grid = encoder.grid_size
        self.out_chans = out_chans
        self.proj = nn.Conv2d(encoder.embed_dim, self.encoder_stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(self.encoder_stride)
        self._patchify = encoder.patchify

    requires_full_sequence = True

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict every patch's pixels.

        Args:
            tokens: Encoder output ``[B, 1 + L, D]``.
            mask: ``[B, L]`` (unused: every position is predicted, the loss picks).
            ids_restore: Unused.

        Returns:
            ``[B, L, p*p*C]`` in :meth:`ViTEncoder.patchify` order.
        """
        b, _, d = tokens.shape
        gh, gw = self.grid
        x = tokens[:, 1:].transpose(1, 2).reshape(b, d, gh, gw)  # [B, D, gh, gw]
        img = self.shuffle(self.proj(x))  # [B, C, H, W]
        return self._patchify(img)  # [B, L, p*p*C]
