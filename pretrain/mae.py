"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

The encoder sees only the visible 25 % of patches (no mask tokens,
:meth:`pretrain.encoders.vit.ViTEncoder.forward_visible`); a lightweight transformer decoder receives
the encoded visible tokens plus a shared learned mask token at every masked position, each with a
fixed 2-D sin-cos position embedding, and predicts the pixels of every patch. The loss is the
MSE on per-patch normalized pixels (``norm_pix_loss``), averaged over masked patches only
(Sec. 3, Table 1).

Paper defaults (its recipe file, ``pretrain/recipes/mae.yaml``): mask ratio 0.75, decoder of 8
blocks x 512 wide (16 heads) for ViT-B/L, AdamW base lr 1.5e-4 per 256, weight decay 0.05,
betas (0.9, 0.95), 40 warmup epochs, RandomResizedCrop scale [0.2, 1].
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from harness.core.config import HeadConfig
from pretrain.encoders.vit import sincos_pos_embed_2d
from pretrain.heads import HEADS, Head


@HEADS.register("mae_decoder")
class MAEDecoder(Head):
    """MAE's transformer decoder.

    Args:
        encoder: The ViT encoder whose tokens it reads (one class token, one token per patch).
        cfg: Decoder depth, width, heads and MLP ratio.
        out_dim: Predictions per patch (``p*p*3`` for pixels, the vocabulary for tokens, ...).
        pixel_channels: Unused.
    """

    def __init__(
        self, encoder: nn.Module, cfg: HeadConfig, out_dim: int, pixel_channels: int | None = None
    ) -> None:
        super().__init__()
        if encoder.num_prefix_tokens != 1 or encoder.encoder_stride != encoder.patch_size:
            raise ValueError(
                "mae_decoder reads a ViT's class token and one token per patch; use head.type "
                "linear, mlp or inverse_swin with this encoder"
            )
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"decoder dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.num_patches = encoder.num_patches
        self.decoder_embed = nn.Linear(encoder.embed_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        pe = torch.zeros(1, 1 + self.num_patches, cfg.dim)
        pe[0, 1:] = torch.from_numpy(sincos_pos_embed_2d(cfg.dim, *encoder.grid_size))
        self.decoder_pos_embed = nn.Parameter(pe, requires_grad=False)  # fixed sin-cos
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True)
            for _ in range(cfg.depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    requires_full_sequence = False

    def no_weight_decay(self) -> set[str]:
        """The mask token and the (fixed) position embedding (MAE's reference code)."""
        return {"mask_token", "decoder_pos_embed"}

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict every patch's pixels.

        Args:
            tokens: ``[B, 1 + K, D]`` visible tokens (visible-first order given by
                ``ids_restore``) or ``[B, 1 + L, D]`` when the encoder ran with mask tokens.
            mask: ``[B, L]``, True = masked.
            ids_restore: ``[B, L]`` un-shuffle indices; None when ``tokens`` covers all patches.

        Returns:
            ``[B, L, out_dim]``.
        """
        x = self.embed_grid(tokens, ids_restore)  # [B, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:]  # [B, L, out_dim]


    def embed_grid(
        self, tokens: torch.Tensor, ids_restore: torch.Tensor | None
    ) -> torch.Tensor:
        """The decoder's input ``[B, 1 + L, Dd]``: the embedded tokens in grid order, the mask
        token at every position the encoder did not see, plus the fixed position embedding."""
        x = self.decoder_embed(tokens)  # [B, 1 + K, Dd]
        if ids_restore is not None:
            b, k1, dd = x.shape
            n_mask = self.num_patches + 1 - k1
            fill = self.mask_token.expand(b, n_mask, dd).to(x.dtype)
            x_ = torch.cat([x[:, 1:], fill], dim=1)  # [B, L, Dd] in visible-first order
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # grid order
            x = torch.cat([x[:, :1], x_], dim=1)  # [B, 1 + L, Dd]
        return x + self.decoder_pos_embed.to(x.dtype)


def _init_weights(m: nn.Module) -> None:
    # MAE initializes linear layers with xavier_uniform and LayerNorms to identity.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
