"""Prediction targets and losses: the ``target`` and ``loss`` axes of a recipe.

Targets live in patch space (see :meth:`ViTEncoder.patchify`): one row per patch, ``[B, L, P]``
values for continuous targets, ``[B, L, G]`` class indices for discrete ones (``G`` groups of
``num_classes`` each; the head then predicts ``G * num_classes`` logits per patch).

* ``pixels``: the (ImageNet-normalized) input pixels (SimMIM).
* ``norm_pixels``: each patch normalized by its own mean and variance (MAE's ``norm_pix_loss``,
  He et al. 2022, Sec. 3 and Table 1d; unbiased variance, eps 1e-6 as in the reference code).
* ``color_bins``: each pixel's R, G and B in ``bins`` uniform bins of [0, 1] (SimMIM's
  channel-wise colour bins, Table 5 and Table 13: 2 to 256 bins), one classification per pixel
  and channel.
* ``color_clusters`` (:mod:`pretrain.color_clusters`): each pixel's nearest of iGPT's RGB colour
  clusters (SimMIM Table 5).
* ``hog`` (:mod:`pretrain.maskfeat`), ``mean_color`` (:mod:`pretrain.vit_mpp`) and ``tokens``
  (:mod:`pretrain.beit`) register themselves in :data:`TARGETS`.

Each target picks the loss of the recipe's ``loss`` axis (:mod:`pretrain.losses`): a
regression for continuous targets, a classification for discrete ones.

Prediction resolution (``target.resolution``, SimMIM Sec. 4.1.4 and Table 3: targets of 6^2 to
192^2 at 192 px input): a target that ``supports_resolution`` is taken from the input
average-pooled to ``k x k`` (:func:`harness.core.config.recipe.target_grid`). At ``k`` >= the patch grid each patch holds
``(k / grid)^2`` target pixels, so the rows stay the patches; below it each row is one target
pixel covering ``(grid / k)^2`` patches, the prediction grid is ``k x k`` and the loss weights
each cell by the fraction of its patches that are masked (the patch mask average-pooled, which
is exact whenever masked units are whole cells, as SimMIM's 32 px units at ``k >= 6``). The
public SimMIM code (``models/simmim.py``: 1x1 conv to ``stride^2 * 3`` channels, pixel shuffle
of the stride, L1 over the masked pixels of the mask upsampled to pixels) holds the 192^2
default only; average pooling of target and mask is the harness's reading of the ablation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import LossConfig, TargetConfig, TeacherConfig
from harness.core.config.axes import TARGETS as _TARGETS
from harness.core.config.recipe import target_grid
from harness.core.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from harness.core.registry import Registry
from pretrain.losses import classification_loss, reconstruction_loss

TARGETS: Registry[type[Target]] = _TARGETS  # the core registry (config validation reads it)

# (n) -> n training images [n, 3, H, W] (normalized, train augmentation): what tokenizers fit on.
ImageSampler = Callable[[int], torch.Tensor]


# --------------------------------------------------------------------------- pixel helpers


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, p*p*C]`` (row-major patches, channels last inside a patch)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """``[B, L, p*p*C] -> [B, C, H, W]``, the inverse of :func:`patchify`."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * p, gw * p)


def to_unit(imgs: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized images to [0, 1] (clamped)."""
    mean = imgs.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0.0, 1.0)


def from_unit(imgs: torch.Tensor) -> torch.Tensor:
    """[0, 1] images to ImageNet-normalized ones."""
    mean = imgs.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs - mean) / std


# --------------------------------------------------------------------------- targets


@dataclass
class TargetOut:
    """A target batch: ``value`` ``[B, L, P]`` (float) or ``[B, L, G]`` (long class indices);
    ``mean`` / ``std`` ``[B, L, 1]`` for ``norm_pixels`` (to undo it for display)."""

    value: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


class Target(nn.Module):
    """Base class of the targets.

    Attributes:
        out_dim: Head outputs per cell of the prediction grid (per patch by default).
        num_classes: Classes per group for discrete targets (0 for continuous ones).
        pixel_channels: For targets that are a per-pixel map at the input's resolution (pixels,
            color bins), the values per pixel, so a head may predict a full-resolution map (the
            ``upconv`` head); None for per-patch targets and lower target resolutions.
        discrete_target: Whether the target is class indices (config validation pairs it with
            a discrete loss, :mod:`pretrain.losses`).
        supports_resolution: Whether ``target.resolution`` applies (config validation reads it).
        multi_view: Whether the target compares several views of each image: it gets them as
            ``[B, V, C, H, W]`` and the student's predictions of all ``B * V`` views (config
            validation allows ``recipe.global_crops > 1`` only then).
        takes_local_crops: Whether the target's loss also takes the student's class tokens of
            smaller local crops (iBOT's multi-crop; config validation allows
            ``recipe.local_crops > 0`` only then): :meth:`loss` gets them as ``local``.
        needs_teacher: Whether the target is computed by an EMA teacher (config validation
            then requires ``recipe.teacher``, :mod:`pretrain.teacher`).
        needs_pairs: Whether the target classifies patch pairs (config validation then
            requires ``recipe.pairs``, :mod:`pretrain.context_prediction`).
        patchwise_encoder: Whether the recipe runs the encoder on each image patch on its own
            (Selfie, context prediction: config validation requires a conv encoder).
        resolution: Side of the target image (the input's side unless ``target.resolution``).
        pred_grid: The grid the head predicts on and the loss averages over
            (:func:`harness.core.config.recipe.target_grid`).
        cell: Target pixels per side of one prediction-grid cell.
    """

    discrete_target: ClassVar[bool] = False
    supports_resolution: ClassVar[bool] = False
    multi_view: ClassVar[bool] = False
    takes_local_crops: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    needs_pairs: ClassVar[bool] = False
    patchwise_encoder: ClassVar[bool] = False
    out_dim: int = 0
    num_classes: int = 0
    pixel_channels: int | None = None

    @classmethod
    def class_token_weights(cls, cfg: TargetConfig) -> dict[str, float]:
        """The loss weights of this target that read the encoder's class token, by key path
        under ``target`` (config validation refuses a positive one for an encoder family
        without a class token, :func:`harness.core.config.recipe.check_target_encoder`)."""
        return {}

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = patch_size
        self.grid = grid
        self.img_size = patch_size * grid[0]
        self.resolution = cfg.resolution or self.img_size
        self.pred_grid, self.cell = target_grid(self.resolution, patch_size, grid)
        self.pool = self.img_size // self.resolution  # input pixels per target pixel side

    def downsample(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, C, k, k]``: the average of each ``pool x pool`` block."""
        return F.avg_pool2d(imgs, self.pool) if self.pool > 1 else imgs

    def cells(self, maps: torch.Tensor) -> torch.Tensor:
        """A target-resolution map ``[B, C, k, k]`` as rows of the prediction grid
        ``[B, L', cell*cell*C]``."""
        return patchify(maps, self.cell)

    def cell_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The patch mask ``[B, L]`` on the prediction grid: itself on the patch grid, else the
        fraction of each cell's patches that are masked, ``[B, k*k]`` float."""
        if tuple(self.pred_grid) == tuple(self.grid):
            return mask
        b = mask.shape[0]
        m = mask.view(b, 1, self.grid[0], self.grid[1]).float()
        return F.avg_pool2d(m, self.grid[0] // self.pred_grid[0]).flatten(1)  # [B, k*k]

    def to_image(self, rows: torch.Tensor, channels: int = 3) -> torch.Tensor:
        """Rows of the prediction grid ``[B, L', cell*cell*C]`` as a map at the input size
        ``[B, C, H, W]`` (each target pixel repeated over its ``pool x pool`` block)."""
        maps = unpatchify(rows, self.cell, self.pred_grid, channels)  # [B, C, k, k]
        if self.pool == 1:
            return maps
        return maps.repeat_interleave(self.pool, 2).repeat_interleave(self.pool, 3)

    @classmethod
    def from_encoder(
        cls, cfg: TargetConfig, encoder: nn.Module, teacher: TeacherConfig | None = None
    ) -> Target:
        """Build the target for the encoder being pretrained: the model's construction hook.

        The default reads the encoder's patch size and grid; a target that needs the encoder
        itself (an EMA teacher copying its weights, configured by ``teacher``) overrides this.
        """
        return cls(cfg, encoder.patch_size, encoder.grid_size)  # type: ignore[arg-type]

    def set_run_length(self, total_steps: int) -> None:
        """Told once, before the first step, how many optimizer steps the run has (a momentum
        schedule over the whole run); default: nothing."""

    def exported_encoder(self, encoder: nn.Module) -> tuple[str, nn.Module]:
        """What the encoder file holds, and its name for the summary: the trained ``student``
        by default (a teacher target may export its teacher)."""
        return "student", encoder

    def statistics(self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor) -> dict[str, float]:
        """Per-step statistics of the target for the log (collapse of a latent target);
        default: none."""
        return {}

    @property
    def discrete(self) -> bool:
        return self.num_classes > 0

    def no_weight_decay(self) -> set[str]:
        """Names of this target's parameters exempt from weight decay besides biases and norm
        weights (the model prefixes them with ``target.``); default: none."""
        return set()

    def after_step(self, encoder: nn.Module, step: int) -> None:
        """Called once after every optimizer step with the encoder being trained and the number
        of steps done (an EMA teacher updates its weights here); default: nothing."""

    def prepare(self, sample_images: ImageSampler, log: Callable[[str], None]) -> None:
        """Fit whatever the target needs before pretraining (a tokenizer); default: nothing."""

    def pixel_codebook(self) -> torch.Tensor | None:
        """The fitted colour-cluster codebook ``[K, 3]`` in [0, 1] RGB that an encoder which
        ``tokenizes_pixels`` reads (iGPT), or None: the target has none (or it is not fitted)."""
        return None

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        """Targets of normalized images ``[B, C, H, W]``."""
        raise NotImplementedError

    def loss(
        self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor, cfg: LossConfig,
        local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The recipe's loss of ``pred`` ``[B, L', out_dim]`` against the target, averaged over
        the cells of the prediction grid that the patch mask ``[B, L]`` covers. ``local``: the
        student's class tokens of the local crops (only a target that ``takes_local_crops``
        gets them; None here)."""
        weights = self.cell_mask(mask)
        if self.discrete:
            return classification_loss(pred, tgt.value, weights, cfg, self.num_classes)
        return reconstruction_loss(pred, tgt.value, weights, cfg)

    def prefix_loss(
        self, tokens: torch.Tensor, tgt: TargetOut, cfg: LossConfig
    ) -> torch.Tensor | None:
        """A loss on the student's prefix (class) tokens, added to :meth:`loss` (data2vec 2.0's
        class-token loss); default: none.

        Args:
            tokens: The student encoder's output ``[B, P + K, D]``.
            tgt: This batch's target (one row per student image).
            cfg: The recipe's loss.
        """
        return None

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor | None:
        """The prediction drawn as an image in [0, 1] ``[B, 3, H, W]``, or None."""
        return None

    def target_image(self, tgt: TargetOut) -> torch.Tensor | None:
        """The target drawn as an image in [0, 1] when it is not the input itself, or None."""
        return None


@TARGETS.register("pixels")
class PixelTarget(Target):
    """The normalized input pixels (SimMIM), at ``target.resolution`` when given."""

    supports_resolution = True

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.out_dim = self.cell * self.cell * 3
        self.pixel_channels = 3 if self.pool == 1 else None

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        return TargetOut(self.cells(self.downsample(imgs)))  # [B, L', cell*cell*3]

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        pred = pred.float()
        if tgt.mean is not None and tgt.std is not None:
            pred = pred * tgt.std + tgt.mean
        return to_unit(self.to_image(pred))

    def target_image(self, tgt: TargetOut) -> torch.Tensor | None:
        """None at the input's resolution (the target is the input); else the pooled input."""
        if self.pool == 1:
            return None
        value = tgt.value.float()
        if tgt.mean is not None and tgt.std is not None:
            value = value * tgt.std + tgt.mean
        return to_unit(self.to_image(value))


@TARGETS.register("norm_pixels")
class NormPixelTarget(PixelTarget):
    """Per-patch normalized pixels (MAE's ``norm_pix_loss``)."""

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        value, mean, std = make_target(self.cells(self.downsample(imgs)), self.cfg)
        return TargetOut(value, mean, std)


@TARGETS.register("color_bins")
class ColorBinsTarget(Target):
    """Each pixel's channel values in ``bins`` uniform bins of [0, 1]: ``cell*cell*3``
    classifications per cell (SimMIM's channel-wise colour bins: Table 5's 8-bin and 256-bin
    targets, Table 13's 2 to 256 bins at 6^2, 48^2 and 192^2). At a lower ``target.resolution``
    the input is average-pooled first, then binned."""

    discrete_target = True
    supports_resolution = True

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.num_classes = cfg.bins
        self.out_dim = self.cell * self.cell * 3 * cfg.bins
        self.pixel_channels = 3 * cfg.bins if self.pool == 1 else None

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        unit = to_unit(self.downsample(imgs.float()))  # [B, 3, k, k] in [0, 1]
        bins = (unit * self.num_classes).long().clamp_(max=self.num_classes - 1)
        return TargetOut(self.cells(bins))  # [B, L', cell*cell*3] in [0, bins)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        b, n, _ = pred.shape
        idx = pred.float().view(b, n, -1, self.num_classes).argmax(-1)  # [B, L', cell*cell*3]
        return self.to_image((idx.float() + 0.5) / self.num_classes)

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        return self.to_image((tgt.value.float() + 0.5) / self.num_classes)


# --------------------------------------------------------------------------- functions


def make_target(
    patches: torch.Tensor, cfg: TargetConfig
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Turn patchified pixels ``[B, L, P]`` into a pixel target.

    Returns:
        The target, and for ``norm_pixels`` the per-patch mean and std (to undo it for display).
    """
    if cfg.type == "pixels":
        return patches, None, None
    if cfg.type == "norm_pixels":
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        std = (var + 1.0e-6) ** 0.5
        return (patches - mean) / std, mean, std
    raise ValueError(f"make_target handles pixel targets only, got '{cfg.type}'")
