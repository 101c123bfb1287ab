"""Losses: the ``loss`` axis of a recipe, one registered class per ``loss.type``.

A loss averages an element-wise error (or a cross-entropy per group) within each patch, then
over the masked patches (``on: masked``, every paper's default) or over all patches (``on: all``,
SimMIM Table 5). For SimMIM's L1 this equals the paper's sum over masked pixels and channels
divided by their count (Xie et al., CVPR 2022, Sec. 3.4); MAE's MSE is ``l2`` (He et al., CVPR
2022, Sec. 3).

A new loss is one class registered in :data:`LOSSES` (the core registry that config validation
reads): ``discrete`` says whether it compares logits with class indices (discrete targets:
color bins, mean color, tokens) or values with values.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from harness.core.config import LossConfig
from harness.core.config.axes import LOSSES as _LOSSES
from harness.core.registry import Registry

LOSSES: Registry[type[Loss]] = _LOSSES  # the core registry (config validation reads it)


class Loss:
    """Base class of the regression losses: ``error`` is element-wise, ``[B, L, P]``."""

    discrete: ClassVar[bool] = False

    @staticmethod
    def error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Element-wise error of float ``pred`` against ``target``, both ``[B, L, P]``."""
        raise NotImplementedError

    @classmethod
    def configured_error(
        cls, pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig
    ) -> torch.Tensor:
        """:meth:`error` under the recipe's loss settings (a loss with a parameter reads it
        from ``cfg``); default: :meth:`error`."""
        return cls.error(pred, target)


@LOSSES.register("l1")
class L1Loss(Loss):
    """Absolute error (SimMIM)."""

    @staticmethod
    def error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).abs()


@LOSSES.register("l2")
class L2Loss(Loss):
    """Squared error (MAE, MaskFeat, Context Encoder)."""

    @staticmethod
    def error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target) ** 2


@LOSSES.register("smooth_l1")
class SmoothL1Loss(Loss):
    """Smooth L1: ``beta = 1`` in SimMIM Table 5, ``loss.beta`` otherwise (data2vec: 2)."""

    @staticmethod
    def error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)

    @classmethod
    def configured_error(
        cls, pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig
    ) -> torch.Tensor:
        return F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.beta)


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(Loss):
    """Cross-entropy per group of logits (BEiT's tokens, ViT's mean color, color bins)."""

    discrete = True


def _average(per_patch: torch.Tensor, mask: torch.Tensor, on: str) -> torch.Tensor:
    if on == "all":
        return per_patch.mean()
    w = mask.to(per_patch.dtype)
    return (per_patch * w).sum() / w.sum().clamp_min(1.0)


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """Element-wise loss, mean within each patch (or the sum over ``sqrt(P)``, data2vec's
    ``loss_scale``: ``loss.patch_reduce``), mean over masked (or all) patches.

    Args:
        pred: ``[B, L, P]``.
        target: ``[B, L, P]``.
        mask: ``[B, L]`` boolean, True = masked.
        cfg: Loss type and averaging.
    """
    loss = LOSSES.get(cfg.type)
    if loss.discrete:
        raise ValueError(f"loss '{cfg.type}' does not apply to a continuous target")
    err = loss.configured_error(pred.float(), target.float(), cfg)  # [B, L, P]
    per_patch = err.mean(dim=-1)  # [B, L]
    if cfg.patch_reduce == "sum_rsqrt_dim":  # sum / sqrt(P) = mean * sqrt(P)
        per_patch = err.sum(dim=-1) / math.sqrt(err.shape[-1])
    return _average(per_patch, mask, cfg.on)  # [B, L] -> scalar


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    num_classes: int,
) -> torch.Tensor:
    """Cross-entropy per group, mean within each patch, mean over masked (or all) patches.

    Args:
        logits: ``[B, L, G * K]``.
        labels: ``[B, L, G]`` class indices in ``[0, K)``.
        mask: ``[B, L]`` boolean, True = masked.
        cfg: ``type`` must be a discrete loss (``cross_entropy``).
        num_classes: ``K``.
    """
    if not LOSSES.get(cfg.type).discrete:
        raise ValueError(f"a discrete target needs loss 'cross_entropy', got '{cfg.type}'")
    b, n, g = labels.shape
    ce = F.cross_entropy(
        logits.float().reshape(b * n * g, num_classes), labels.reshape(-1), reduction="none"
    )
    return _average(ce.view(b, n, g).mean(dim=-1), mask, cfg.on)
