"""ViT masked patch prediction (Dosovitskiy et al., ICLR 2021, Sec. 4.6 and appendix B.1.2).

The ViT paper's self-supervision preliminary: corrupt 50 % of the patch embeddings, BERT-style,
by replacing 80 % of them with a learnable [mask] embedding, 10 % with another patch's embedding
and leaving 10 % unchanged; then predict, for every corrupted patch, its mean color quantized to
3 bits per channel: one 512-way classification (``target.type: mean_color, bins: 8``, loss
``cross_entropy`` on the masked patches). The corruption is the ``masking.mask_token_prob`` /
``random_token_prob`` axis, valid for any recipe whose encoder runs with mask tokens.

Here "another patch" is a patch drawn uniformly from the whole batch (other images included),
resampled when it would be the patch itself; corrupted patches are chosen by the masker (50 %,
MAE's shuffle: the same count per image) and split 80/10/10 independently per patch.
"""

from __future__ import annotations

import torch
from torch import nn

from harness.core.config import MaskingConfig, TargetConfig
from pretrain.targets import TARGETS, Target, TargetOut, patchify, to_unit, unpatchify


def corrupt_and_encode(
    encoder: nn.Module, imgs: torch.Tensor, mask: torch.Tensor, cfg: MaskingConfig
) -> torch.Tensor:
    """Encode ``imgs`` with the masked patches' embeddings corrupted (mask token / random / kept).

    Args:
        encoder: An encoder with ``patch_tokens`` and ``forward_tokens`` (ViT or Swin).
        imgs: ``[B, C, H, W]``.
        mask: ``[B, L]`` patches to corrupt.
        cfg: ``mask_token_prob`` and ``random_token_prob``.

    Returns:
        The encoder's output tokens.
    """
    t = encoder.patch_tokens(imgs)  # [B, L, D]
    b, n, d = t.shape
    u = torch.rand(b, n, device=t.device)  # the engine seeds torch's RNG: resumable
    to_mask = mask & (u < cfg.mask_token_prob)
    to_random = (
        mask & (u >= cfg.mask_token_prob) & (u < cfg.mask_token_prob + cfg.random_token_prob)
    )
    if bool(to_random.any()):
        flat = t.reshape(b * n, d)
        src = torch.randint(0, b * n - 1, (b, n), device=t.device)
        own = torch.arange(b * n, device=t.device).view(b, n)
        src = src + (src >= own).long()  # uniform over every patch but the patch itself
        t = torch.where(to_random.unsqueeze(-1), flat[src], t)  # [B, L, D]
    return encoder.forward_tokens(t, to_mask)


@TARGETS.register("mean_color")
class MeanColorTarget(Target):
    """A patch's mean color in ``bins`` levels per channel, as one ``bins^3``-way class
    (ViT: 3 bits, 512 classes). Means are taken on [0, 1] pixels; class ``(r * bins + g) * bins + b``."""

    discrete_target = True

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.bins = cfg.bins
        self.num_classes = cfg.bins**3
        self.out_dim = self.num_classes

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        p = self.patch_size
        rgb = (
            patchify(to_unit(imgs.float()), p).view(imgs.shape[0], -1, p * p, 3).mean(dim=2)
        )  # [B, L, 3]
        q = (rgb * self.bins).long().clamp_(max=self.bins - 1)
        cls = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        return TargetOut(cls.unsqueeze(-1))  # [B, L, 1]

    def _paint(self, cls: torch.Tensor) -> torch.Tensor:
        k = self.bins
        rgb = torch.stack([cls // (k * k), (cls // k) % k, cls % k], dim=-1).float()
        rgb = (rgb + 0.5) / k  # [B, L, 3], bin centers
        p = self.patch_size
        pix = rgb.unsqueeze(2).expand(-1, -1, p * p, -1).reshape(rgb.shape[0], -1, p * p * 3)
        return unpatchify(pix, p, self.grid)  # [B, 3, H, W]

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        return self._paint(pred.argmax(dim=-1))

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        return self._paint(tgt.value[..., 0])
