"""Reconstruction targets and losses shared by the pixel-predicting recipes.

Targets live in patch space ``[B, L, p*p*C]`` (see :meth:`ViTEncoder.patchify`):

* ``pixels``: the (ImageNet-normalized) input pixels (SimMIM).
* ``norm_pixels``: each patch normalized by its own mean and variance (MAE's ``norm_pix_loss``,
  He et al. 2022, Sec. 3 and Table 1c; unbiased variance, eps 1e-6 as in the reference code).

Losses average an element-wise error within each patch, then over the masked patches
(``on: masked``, both papers) or over all patches (``on: all``, SimMIM Table 5). For SimMIM's
L1 this equals the paper's sum over masked pixels and channels divided by their count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.config import LossConfig, TargetConfig


def make_target(patches: torch.Tensor, cfg: TargetConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Turn patchified pixels ``[B, L, P]`` into the target.

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
    raise ValueError(f"unknown target '{cfg.type}'")


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """Element-wise loss, mean within each patch, mean over masked (or all) patches.

    Args:
        pred: ``[B, L, P]``.
        target: ``[B, L, P]``.
        mask: ``[B, L]`` boolean, True = masked.
        cfg: Loss type and averaging.
    """
    pred = pred.float()
    target = target.float()
    if cfg.type == "l1":
        err = (pred - target).abs()
    elif cfg.type == "l2":
        err = (pred - target) ** 2
    elif cfg.type == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    else:
        raise ValueError(f"unknown loss '{cfg.type}'")
    per_patch = err.mean(dim=-1)  # [B, L]
    if cfg.on == "all":
        return per_patch.mean()
    w = mask.to(per_patch.dtype)
    return (per_patch * w).sum() / w.sum().clamp_min(1.0)
