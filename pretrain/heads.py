"""Prediction heads: the ``head`` axis of a recipe.

Every head maps the encoder's output tokens to one prediction per patch, ``[B, L, out_dim]`` in
:meth:`ViTEncoder.patchify` order, where ``out_dim`` comes from the target (``p*p*3`` pixels,
108 HOG values, 8192 token logits, ...). Heads read the encoder through its output contract:
``num_prefix_tokens``, ``num_features``, ``feature_grid`` and ``encoder_stride``; when the stride
exceeds the patch size (Swin: 32 px vs 4 px patches), the head upsamples by
``r = encoder_stride / patch_size`` to the patch grid.

* ``linear`` (SimMIM, :mod:`pretrain.simmim`): a 1x1 conv + pixel shuffle.
* ``mlp``: a 2-layer MLP per output token, then the same pixel shuffle (SimMIM Table 2).
* ``inverse_swin``: Swin blocks in reverse order of a Swin encoder, each stage after the first
  doubling the resolution (Swin-Unet's patch expanding), then a linear layer (SimMIM Table 2's
  "inverse Swin-T / Swin-B").
* ``mae_decoder`` (:mod:`pretrain.mae`) and ``upconv`` (:mod:`pretrain.context_encoder`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

from harness.core.config import HeadConfig
from harness.core.config.axes import HEADS as _HEADS
from harness.core.registry import Registry

HEADS: Registry[type[Head]] = _HEADS  # the core registry (config validation reads it)


class Head(nn.Module):
    """Base class of the heads: ``forward(tokens, mask, ids_restore) -> [B, L', out_dim]``.

    ``L'`` is the number of cells of the prediction grid, the target's
    (:attr:`pretrain.targets.Target.pred_grid`): the patch grid unless the target is taken at
    a lower resolution (``target.resolution``, SimMIM Table 3), which every constructor gets as
    ``pred_grid`` (None: the patch grid).

    Attributes:
        requires_full_sequence: Whether the head reads a token at every position (so it needs
            ``encoder_mode: mask_token``); MAE's decoder fills masked positions itself.
        patch_grid_only: Whether the head predicts on the patch grid only (MAE's decoder, the
            up-conv head); the others upsample the encoder's grid by any whole factor.
        narrow: Whether ``head.dim`` may not exceed the encoder's width (I-JEPA's predictor
            is a bottleneck; config validation compares them).
        predicts_subset: Whether the head builds its predictions at the predicted positions
            only (one query per position: I-JEPA's and CAPI's predictors), so that predicting a
            random subset of the masked patches (``masking.predict_fraction`` < 1) saves its
            work; config validation refuses that value for the other heads.
        equal_counts: Whether the head batches the predicted positions of every image as one
            tensor, so it needs the same predicted count in each (CAPI's predictor); config
            validation refuses a masker whose count varies per image.
    """

    requires_full_sequence: bool = True
    patch_grid_only: ClassVar[bool] = False
    narrow: ClassVar[bool] = False
    predicts_subset: ClassVar[bool] = False
    equal_counts: ClassVar[bool] = False

    @classmethod
    def upsampling(cls, pred: int, patch_grid: int, feature: int) -> int:
        """How far the head upsamples the encoder's output grid to the prediction grid (sides).

        The one rule for config validation (:func:`harness.core.config.recipe.check_target_fits`)
        and for the heads' construction.

        Args:
            pred: Side of the prediction grid.
            patch_grid: Side of the encoder's patch grid.
            feature: Side of the encoder's output grid (the patch grid over the stride).

        Raises:
            ValueError: The head cannot produce that grid (the message names both sides).
        """
        if cls.patch_grid_only and pred != patch_grid:
            raise ValueError(
                f"this head predicts on the {patch_grid}x{patch_grid} patch grid only, not on a "
                f"{pred}x{pred} target grid: use head.type linear, mlp or inverse_swin"
            )
        if pred % feature:
            raise ValueError(
                f"the {pred}x{pred} target grid is not a whole multiple of the encoder's "
                f"{feature}x{feature} output grid: use a target.resolution that is a multiple of "
                f"{feature}"
            )
        return pred // feature

    @classmethod
    def check_config(cls, cfg: HeadConfig, width: int) -> None:
        """Refuse a head config that cannot be built, or cannot read an encoder of ``width``
        channels; the one rule for config validation
        (:func:`harness.core.config.recipe.check_encoder_fits`) and the head's construction. The
        base class accepts every config.

        Raises:
            ValueError: Naming both values and the fix.
        """

    def no_weight_decay(self) -> set[str]:
        """Names of this head's parameters exempt from weight decay besides biases and norm
        weights (the model prefixes them with ``head.``)."""
        return set()


def tokens_to_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Drop ``prefix`` tokens and lay the rest out as a map: ``[B, P + h*w, C] -> [B, C, h, w]``."""
    b, _, c = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(b, c, grid[0], grid[1])


def upsample_factor(encoder: nn.Module, pred_grid: tuple[int, int] | None = None) -> int:
    """How far a head upsamples the encoder's output grid to reach ``pred_grid`` (None: the
    patch grid, a factor ``encoder_stride / patch_size``)."""
    stride, p = int(encoder.encoder_stride), int(encoder.patch_size)
    if stride % p:
        raise ValueError(f"encoder stride {stride} is not a multiple of the patch size {p}")
    if pred_grid is None or tuple(pred_grid) == tuple(encoder.grid_size):
        return stride // p
    return Head.upsampling(int(pred_grid[0]), int(encoder.grid_size[0]),
                           int(encoder.feature_grid[0]))


def map_to_patches(x: torch.Tensor) -> torch.Tensor:
    """``[B, D, gh, gw] -> [B, L, D]`` (row-major over the patch grid)."""
    return x.flatten(2).transpose(1, 2)


@HEADS.register("mlp")
class MLPHead(Head):
    """Two layers per output token (1x1 convs with GELU), then a pixel shuffle to the patch grid.

    Args:
        encoder: The encoder whose tokens it reads.
        cfg: ``dim`` is the hidden width.
        out_dim: Predictions per cell of the prediction grid (per patch by default).
        pixel_channels: Unused.
        pred_grid: The target's prediction grid (None: the patch grid).
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
        self.fc1 = nn.Conv2d(encoder.num_features, cfg.dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(cfg.dim, out_dim * r * r, kernel_size=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = tokens_to_map(tokens, self.prefix, self.grid)  # [B, C, h, w]
        x = self.shuffle(self.fc2(self.act(self.fc1(x))))  # [B, out_dim, gh, gw]
        return map_to_patches(x)  # [B, L, out_dim]


class _PatchExpand(nn.Module):
    """Swin-Unet's patch expanding: ``[B, H, W, C] -> [B, 2H, 2W, C/2]`` (linear to 2C, then
    the four C/2 slices go to the four pixels of each 2x2 cell)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = self.expand(x).reshape(b, h, w, 2, 2, c // 2)  # [B, H, W, 2, 2, C/2]
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 2)
        return self.norm(x)


@HEADS.register("inverse_swin")
class InverseSwinHead(Head):
    """Swin stages from the encoder's stride back to the patch grid, then a linear layer.

    Stage ``i`` works at ``2^i`` times the encoder's output resolution with width ``dim / 2^i``
    and ``num_heads / 2^i`` heads (at least 1); stages after the first start with a patch
    expansion. SimMIM's inverse Swin-T on Swin-B: ``dim 768, num_heads 24,
    stage_depths [2, 6, 2, 2]``.

    Args:
        encoder: The encoder whose tokens it reads.
        cfg: ``dim``, ``num_heads``, ``window_size``, ``mlp_ratio`` and ``stage_depths`` (or
            ``depth`` blocks in every stage).
        out_dim: Predictions per cell of the prediction grid (per patch by default).
        pixel_channels: Unused.
        pred_grid: The target's prediction grid (None: the patch grid).
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
        n_up = int(round(math.log2(r)))
        if 2**n_up != r:
            raise ValueError(
                f"inverse_swin upsamples by powers of 2; the prediction grid is {r}x the "
                "encoder's output grid"
            )
        depths = list(cfg.stage_depths) if cfg.stage_depths else [cfg.depth] * (n_up + 1)
        if len(depths) != n_up + 1:
            raise ValueError(
                f"head.stage_depths has {len(depths)} stages; this encoder needs {n_up + 1} "
                f"(one, plus one per 2x upsampling from stride {encoder.encoder_stride} to "
                f"patch {encoder.patch_size})"
            )
        if cfg.dim % 2**n_up:
            raise ValueError(f"head.dim {cfg.dim} must be divisible by 2^{n_up} (halved per stage)")
        self.prefix, self.grid = int(encoder.num_prefix_tokens), tuple(encoder.feature_grid)
        self.embed = nn.Linear(encoder.num_features, cfg.dim)
        h, w = encoder.feature_grid
        dim, stages = cfg.dim, []
        for i, depth in enumerate(depths):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(_PatchExpand(dim))
                dim, h, w = dim // 2, 2 * h, 2 * w
            heads = max(1, cfg.num_heads // 2**i)
            while dim % heads:
                heads -= 1
            ws = min(cfg.window_size, h, w)
            layers += [
                SwinTransformerBlock(
                    dim,
                    (h, w),
                    num_heads=heads,
                    window_size=ws,
                    shift_size=0 if j % 2 == 0 or ws >= min(h, w) else ws // 2,
                    mlp_ratio=cfg.mlp_ratio,
                )
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = tokens_to_map(tokens, self.prefix, self.grid).permute(0, 2, 3, 1)  # [B, h, w, C]
        x = self.stages(self.embed(x))  # [B, gh, gw, dim_last]
        return self.pred(self.norm(x)).flatten(1, 2)  # [B, L, out_dim]
