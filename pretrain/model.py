"""One model class for every pixel-predicting recipe: encoder + head + target + loss.

The ablation axes of SimMIM and MAE are config values here, not code paths: the masker
(:mod:`pretrain.masking`), whether the encoder sees mask tokens or only visible patches, the head
(SimMIM's linear head in :mod:`pretrain.simmim`, MAE's decoder in :mod:`pretrain.mae`), the
target and the loss (:mod:`pretrain.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.config import EncoderConfig, RecipeConfig
from harness.registry import Registry
from pretrain.encoder import ViTEncoder
from pretrain.mae import MAEDecoder
from pretrain.masking import Masker, create_masker, mask_to_indices
from pretrain.simmim import LinearPixelShuffleHead
from pretrain.targets import make_target, reconstruction_loss

HEADS: Registry[type[nn.Module]] = Registry("head")
HEADS.register("linear", LinearPixelShuffleHead)
HEADS.register("mae_decoder", MAEDecoder)


@dataclass
class MIMOutput:
    """What one forward returns."""

    loss: torch.Tensor
    pred: torch.Tensor  # [B, L, P] in target space
    target: torch.Tensor  # [B, L, P]
    mask: torch.Tensor  # [B, L]
    target_mean: torch.Tensor | None = None  # [B, L, 1] for norm_pixels
    target_std: torch.Tensor | None = None


class MIMModel(nn.Module):
    """Masked image modeling with pixel targets.

    Args:
        encoder_cfg: The encoder to pretrain.
        recipe: Masking, encoder mode, head, target and loss.
    """

    def __init__(self, encoder_cfg: EncoderConfig, recipe: RecipeConfig) -> None:
        super().__init__()
        self.recipe = recipe
        self.encoder = ViTEncoder(encoder_cfg)
        self.head = HEADS.get(recipe.head.type)(self.encoder, recipe.head)
        if recipe.encoder_mode == "visible" and getattr(self.head, "requires_full_sequence", False):
            raise ValueError(
                f"head '{recipe.head.type}' predicts from every token, so it needs "
                "encoder_mode: mask_token (visible-only encoding leaves masked positions empty)"
            )
        self.masker: Masker = create_masker(
            recipe.masking, self.encoder.grid_size, self.encoder.patch_size
        )

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norm weights."""
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {"head.mask_token", "head.decoder_pos_embed"}

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> MIMOutput:
        """Encode with the recipe's mode, predict, and compute the loss.

        Args:
            imgs: Normalized images ``[B, C, H, W]``.
            mask: ``[B, L]`` boolean, True = masked.
        """
        if self.recipe.encoder_mode == "visible":
            ids_keep, ids_restore = mask_to_indices(mask)
            tokens = self.encoder.forward_visible(imgs, ids_keep)  # [B, 1 + K, D]
            pred = self.head(tokens, mask, ids_restore)
        else:
            tokens = self.encoder.forward_features(imgs, mask)  # [B, 1 + L, D]
            pred = self.head(tokens, mask, None)
        target, mean, std = make_target(self.encoder.patchify(imgs), self.recipe.target)
        loss = reconstruction_loss(pred, target, mask, self.recipe.loss)
        return MIMOutput(loss, pred, target, mask, mean, std)

    @torch.no_grad()
    def reconstruct(self, out: MIMOutput) -> torch.Tensor:
        """The prediction as a normalized image ``[B, C, H, W]`` (per-patch stats undone)."""
        pred = out.pred.float()
        if out.target_mean is not None and out.target_std is not None:
            pred = pred * out.target_std + out.target_mean
        return self.encoder.unpatchify(pred)
