"""I-JEPA: Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture
(Assran et al., CVPR 2023); reference code facebookresearch/ijepa.

* Multi-block masks (``masking.strategy: multiblock``; reference ``src/masks/multiblock.py``,
  ``MaskCollator``): per batch one target block size (scale in ``target_scale``, aspect in
  ``aspect``; the reference draws both from one uniform number, and so does this masker) and
  one square context block size (scale in ``context_scale``); per image ``num_targets`` target
  blocks at random places and one context block at a random place, minus every target block
  (no overlap), drawn again while fewer than ``min_context`` patches remain. The context is then
  cut to the batch's smallest context (its first patches in row-major order, as the reference's
  ``cm[:min_keep_enc]``) so that every image encodes the same number of patches. Masks are
  codes per patch: :data:`CONTEXT` 0 (the student encodes it), :data:`TARGET` 1 (predicted)
  and :data:`OUTSIDE` 2 (neither): ``mask != 0`` is what the encoder does not see and
  ``mask == 1`` what the loss reads, the same tests as for a boolean mask.
* The predictor (``head.type: predictor``; reference ``src/models/vision_transformer.py``,
  ``VisionTransformerPredictor``): a narrow transformer over the context tokens (embedded to
  ``head.dim``) plus a learned mask token at every target position, each with a fixed 2-D
  sin-cos position; positions outside both take no part in attention. It is MAE's decoder
  (:class:`pretrain.mae.MAEDecoder`) without the class token and with that attention mask. The
  reference runs each target block through the predictor separately; here all targets of an
  image share one pass (they attend to each other) and a patch in two target blocks is
  predicted once.
* The target (``target.type: latent``, :mod:`pretrain.teacher`): the EMA target encoder's
  output (its final norm) layer-normed again (reference ``src/train.py``, ``forward_target``:
  ``F.layer_norm``), loss smooth L1 (``F.smooth_l1_loss``, beta 1) averaged over the predicted
  patches; the target encoder is what is evaluated.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from harness.core.config import HeadConfig, MaskingConfig
from pretrain.heads import HEADS
from pretrain.inits import linear_norm_init
from pretrain.mae import MAEDecoder
from pretrain.masking import MASKERS, PREDICTED, UNPREDICTED, VISIBLE, Masker

CONTEXT, TARGET, OUTSIDE = VISIBLE, PREDICTED, UNPREDICTED


def block_size(
    n: int, scale: float, aspect: float, grid: tuple[int, int]
) -> tuple[int, int]:
    """``(h, w)`` of a block of ``int(n * scale)`` patches and height / width ``aspect``,
    rounded, and below the grid's sides (as the reference's ``_sample_block_size``)."""
    keep = int(n * scale)
    h = int(round(math.sqrt(keep * aspect)))
    w = int(round(math.sqrt(keep / aspect)))
    return max(1, min(h, grid[0] - 1)), max(1, min(w, grid[1] - 1))


@MASKERS.register("multiblock")
class MultiBlockMasker(Masker):
    """I-JEPA's context and target blocks as per-patch codes ``[B, L]`` (uint8).

    Its target blocks overlap at random, so the predicted count varies per image
    (``varying_predicted``).

    ``last_sizes`` keeps the batch's ``(target (h, w), context (h, w))`` and ``last_targets``
    the target rectangles ``(top, left, h, w)`` of every image of the last batch; the tests
    check them against the configured scales and aspects.
    """

    varying_predicted = True

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.mb = cfg.multiblock
        self.last_sizes: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
        self.last_targets: list[list[tuple[int, int, int, int]]] = []

    def _sizes(self, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
        u = rng.random()  # one draw for the target scale and aspect, as the reference
        (slo, shi), (alo, ahi) = self.mb.target_scale, self.mb.aspect
        target = block_size(self.num_units, slo + u * (shi - slo), alo + u * (ahi - alo),
                            self.unit_grid)  # fmt: skip
        clo, chi = self.mb.context_scale
        context = block_size(self.num_units, clo + rng.random() * (chi - clo), 1.0, self.unit_grid)
        return target, context

    def _place(self, rng: random.Random, h: int, w: int) -> tuple[int, int]:
        uh, uw = self.unit_grid
        return rng.randrange(uh - h + 1), rng.randrange(uw - w + 1)

    def _sample(
        self, rng: random.Random, target: tuple[int, int], context: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
        """One image: the target union and the context (minus the targets), ``[uh, uw]`` bool."""
        targets = np.zeros(self.unit_grid, dtype=bool)
        boxes = []
        for _ in range(self.mb.num_targets):
            top, left = self._place(rng, *target)
            targets[top : top + target[0], left : left + target[1]] = True
            boxes.append((top, left, *target))
        ctx = np.zeros_like(targets)
        for _ in range(100):  # the reference retries too, then relaxes; 100 tries here
            top, left = self._place(rng, *context)
            ctx[:] = False
            ctx[top : top + context[0], left : left + context[1]] = True
            ctx &= ~targets
            if ctx.sum() >= self.mb.min_context:
                break
        return targets, ctx, boxes

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = random.Random(seed)
        target, context = self._sizes(rng)
        self.last_sizes = (target, context)
        drawn = [self._sample(rng, target, context) for _ in range(batch_size)]
        self.last_targets = [boxes for _, _, boxes in drawn]
        keep = min(int(ctx.sum()) for _, ctx, _ in drawn) if drawn else 0
        codes = np.full((batch_size, *self.unit_grid), OUTSIDE, dtype=np.uint8)
        for i, (targets, ctx, _) in enumerate(drawn):
            codes[i][targets] = TARGET
            flat = np.flatnonzero(ctx)[:keep]  # the batch's smallest context, row-major
            codes[i].reshape(-1)[flat] = CONTEXT
        units = torch.from_numpy(codes)
        mask = units.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)
        return mask.reshape(batch_size, self.num_patches)


@HEADS.register("predictor")
class JEPAPredictor(MAEDecoder):
    """I-JEPA's predictor: ``head.depth`` blocks of width ``head.dim`` (narrower than the
    encoder, validated) over the context tokens and a mask token at every target position.

    Args:
        encoder: The ViT encoder (visible-only encoding of the context).
        cfg: Depth, width, heads and MLP ratio (I-JEPA ViT-H/14: depth 12, width 384).
        out_dim: The target's width (the encoder's).
        pixel_channels: Unused.
        pred_grid: Must be the patch grid (or None), as for MAE's decoder.
    """

    narrow = True
    predicts_subset = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(encoder, cfg, out_dim, pixel_channels, pred_grid)
        # The reference's predictor as src/helper.py init_model leaves it: every linear layer
        # trunc-normal(0.02) with zero bias (re-initialised after the predictor's own
        # fix_init_weight, so no residual rescale), LayerNorms 1 / 0, the mask token
        # trunc-normal(0.02); MAE's xavier-uniform from the parent is replaced.
        self.apply(linear_norm_init(lambda t: nn.init.trunc_normal_(t, std=0.02)))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the target tokens.

        Args:
            tokens: ``[B, 1 + K, D]`` the encoded context (visible-first order).
            mask: ``[B, L]`` codes (0 context, 1 target, 2 outside) or booleans (True = masked).
            ids_restore: ``[B, L]`` un-shuffle indices of the visible-only encoding.

        Returns:
            ``[B, L, out_dim]`` (read at the targets).
        """
        if ids_restore is None:
            raise ValueError("head 'predictor' reads a visible-only encoding: set encoder_mode: visible")
        x = self.embed_grid(tokens, ids_restore)[:, 1:]  # [B, L, Dd], no class token
        # keys outside both the context and the targets take no part: [B, 1, 1, L] additive
        outside = (mask == OUTSIDE).to(x.dtype)
        attn_mask = (outside * torch.finfo(x.dtype).min)[:, None, None, :]
        for blk in self.decoder_blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.decoder_pred(self.decoder_norm(x))  # [B, L, out_dim]
