"""Prediction targets and losses: the ``target`` and ``loss`` axes of a recipe.

Targets live in patch space (see :meth:`ViTEncoder.patchify`): one row per patch, ``[B, L, P]``
values for continuous targets, ``[B, L, G]`` class indices for discrete ones (``G`` groups of
``num_classes`` each; the head then predicts ``G * num_classes`` logits per patch).

* ``pixels``: the (ImageNet-normalized) input pixels (SimMIM).
* ``norm_pixels``: each patch normalized by its own mean and variance (MAE's ``norm_pix_loss``,
  He et al. 2022, Sec. 3 and Table 1d; unbiased variance, eps 1e-6 as in the reference code).
* ``color_bins``: each pixel's R, G and B in ``bins`` uniform bins of [0, 1] (SimMIM Table 4's
  "8-bit" color classification with 256 bins), one classification per pixel and channel.
* ``hog`` (:mod:`pretrain.maskfeat`), ``mean_color`` (:mod:`pretrain.vit_mpp`) and ``tokens``
  (:mod:`pretrain.beit`) register themselves in :data:`TARGETS`.

Each target picks the loss of the recipe's ``loss`` axis (:mod:`pretrain.losses`): a
regression for continuous targets, a classification for discrete ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from harness.core.config import LossConfig, TargetConfig, TeacherConfig
from harness.core.config.axes import TARGETS as _TARGETS
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
        out_dim: Head outputs per patch.
        num_classes: Classes per group for discrete targets (0 for continuous ones).
        pixel_channels: For targets that are a per-pixel map (pixels, color bins), the values
            per pixel, so a head may predict a full-resolution map (the ``upconv`` head); None
            for per-patch targets.
        discrete_target: Whether the target is class indices (config validation pairs it with
            a discrete loss, :mod:`pretrain.losses`).
        multi_view: Whether the target compares several views of each image: it gets them as
            ``[B, V, C, H, W]`` and the student's predictions of all ``B * V`` views (config
            validation allows ``recipe.global_crops > 1`` only then).
        needs_teacher: Whether the target is computed by an EMA teacher (config validation
            then requires ``recipe.teacher``, :mod:`pretrain.teacher`).
    """

    discrete_target: ClassVar[bool] = False
    multi_view: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    out_dim: int = 0
    num_classes: int = 0
    pixel_channels: int | None = None

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = patch_size
        self.grid = grid

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

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        """Targets of normalized images ``[B, C, H, W]``."""
        raise NotImplementedError

    def loss(
        self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor, cfg: LossConfig
    ) -> torch.Tensor:
        """The recipe's loss of ``pred`` ``[B, L, out_dim]`` against the target."""
        if self.discrete:
            return classification_loss(pred, tgt.value, mask, cfg, self.num_classes)
        return reconstruction_loss(pred, tgt.value, mask, cfg)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor | None:
        """The prediction drawn as an image in [0, 1] ``[B, 3, H, W]``, or None."""
        return None

    def target_image(self, tgt: TargetOut) -> torch.Tensor | None:
        """The target drawn as an image in [0, 1] when it is not the input itself, or None."""
        return None


@TARGETS.register("pixels")
class PixelTarget(Target):
    """The normalized input pixels (SimMIM)."""

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.out_dim = patch_size * patch_size * 3
        self.pixel_channels = 3

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        return TargetOut(patchify(imgs, self.patch_size))  # [B, L, p*p*3]

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        pred = pred.float()
        if tgt.mean is not None and tgt.std is not None:
            pred = pred * tgt.std + tgt.mean
        return to_unit(unpatchify(pred, self.patch_size, self.grid))


@TARGETS.register("norm_pixels")
class NormPixelTarget(PixelTarget):
    """Per-patch normalized pixels (MAE's ``norm_pix_loss``)."""

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        value, mean, std = make_target(patchify(imgs, self.patch_size), self.cfg)
        return TargetOut(value, mean, std)


@TARGETS.register("color_bins")
class ColorBinsTarget(Target):
    """Each pixel's channel values in ``bins`` uniform bins of [0, 1]: ``p*p*3`` classifications
    per patch (SimMIM Table 4's 8-bit color target is ``bins: 256``)."""

    discrete_target = True

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.num_classes = cfg.bins
        self.out_dim = patch_size * patch_size * 3 * cfg.bins
        self.pixel_channels = 3 * cfg.bins

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        bins = (to_unit(imgs.float()) * self.num_classes).long().clamp_(max=self.num_classes - 1)
        return TargetOut(patchify(bins, self.patch_size))  # [B, L, p*p*3] in [0, bins)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        b, n, _ = pred.shape
        idx = pred.float().view(b, n, -1, self.num_classes).argmax(-1)  # [B, L, p*p*3]
        return unpatchify((idx.float() + 0.5) / self.num_classes, self.patch_size, self.grid)

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        vals = (tgt.value.float() + 0.5) / self.num_classes
        return unpatchify(vals, self.patch_size, self.grid)


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
