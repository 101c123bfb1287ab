"""BEiT: BERT Pre-Training of Image Transformers (Bao et al., ICLR 2022).

BEiT masks about 40 % of the patches block-wise (Algorithm 1: rectangles of at least 16 patches
with aspect ratio in [0.3, 1/0.3], 75 of 196 patches; :class:`pretrain.masking.BlockMasker`),
replaces them by a learned mask token in the encoder, and predicts for every masked position the
visual token of the original patch with a linear layer over the vocabulary and a cross-entropy
loss (Sec. 2.3). The tokens come from a tokenizer frozen during pretraining: DALL-E's dVAE in the
paper (:mod:`pretrain.dall_e`: 8192 tokens on 112 px inputs), or one the harness fits on the
training images first (:mod:`pretrain.tokenizers`: k-means over patch pixels, a VQ-VAE, a dVAE).

This module holds the ``tokens`` target; the rest of BEiT is configuration
(``recipe: {name: beit}``, its recipe file ``pretrain/recipes/beit.yaml``). Reconstruction pictures
show the tokenizer's decoding of the predicted tokens when it has a decoder (k-means, VQ-VAE,
dVAE), and otherwise the token maps in a fixed palette (one color per token id), target beside
prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.core.config import TargetConfig
from pretrain.targets import TARGETS, ImageSampler, Target, TargetOut, unpatchify
from pretrain.tokenizers import create_tokenizer


def token_palette(tokens: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Paint each patch in a color fixed by its token id (golden-ratio hues).

    Args:
        tokens: ``[B, L]`` token ids.
        patch_size: Pixels per patch side.
        grid: Patch grid.

    Returns:
        ``[B, 3, H, W]`` in [0, 1].
    """
    t = tokens.long()
    hue = (t.double() * 0.6180339887498949) % 1.0
    val = 0.55 + 0.4 * ((t * 7919) % 5).double() / 4.0  # vary brightness too
    k = (hue.unsqueeze(-1) * 6.0 + t.new_tensor([5.0, 3.0, 1.0], dtype=torch.double)) % 6.0
    rgb = val.unsqueeze(-1) * (1.0 - 0.7 * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)))  # HSV->RGB
    p = patch_size
    pix = rgb.float().unsqueeze(2).expand(-1, -1, p * p, -1).reshape(t.shape[0], -1, p * p * 3)
    return unpatchify(pix, p, grid)


@TARGETS.register("tokens")
class TokensTarget(Target):
    """Each patch's token from a frozen tokenizer: one ``vocab_size``-way classification."""

    discrete_target = True

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.tokenizer = create_tokenizer(cfg.tokenizer, patch_size * grid[0], grid)
        self.tokenizer.requires_grad_(False)
        self.num_classes = cfg.tokenizer.vocab_size
        self.out_dim = self.num_classes

    def train(self, mode: bool = True) -> TokensTarget:
        super().train(mode)
        self.tokenizer.eval()  # frozen: no dropout / batch statistics updates
        return self

    def prepare(self, sample_images: ImageSampler, log: Callable[[str], None]) -> None:
        """Fit the tokenizer on training images unless it is loaded or already fitted."""
        tok = self.tokenizer
        if not tok.needs_fit or bool(tok.fitted):
            return
        if tok.cfg.path:
            state = torch.load(tok.cfg.path, map_location="cpu", weights_only=True)
            tok.load_state_dict(state.get("state_dict", state))
            log(f"[tokenizer {tok.cfg.type}] loaded {tok.cfg.path}")
            return
        with torch.enable_grad():
            tok.requires_grad_(True)
            tok.fit(sample_images(tok.cfg.train_images), log)
            tok.requires_grad_(False)
        tok.eval()

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> TargetOut:
        return TargetOut(self.tokenizer.encode(imgs).unsqueeze(-1))  # [B, L, 1]

    def _draw(self, tokens: torch.Tensor) -> torch.Tensor:
        img = self.tokenizer.decode(tokens)
        if img is None:
            return token_palette(tokens, self.patch_size, self.grid)
        if img.shape[-1] != self.patch_size * self.grid[1]:
            size = (self.patch_size * self.grid[0], self.patch_size * self.grid[1])
            img = torch.nn.functional.interpolate(
                img, size=size, mode="bilinear", align_corners=False
            )
        return img.clamp(0, 1)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        return self._draw(pred.argmax(dim=-1))

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        return self._draw(tgt.value[..., 0])
