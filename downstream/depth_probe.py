"""Linear monocular depth probe on NYU-Depth v2's layout (frozen encoder).

Protocol: DINOv2's linear depth evaluation (Oquab et al., TMLR 2024, Sec. 7.4, "lin. 1" /
"lin. 4"; ``facebookresearch/dinov2`` ``dinov2/eval/depth/models/decode_heads/decode_head.py``,
``depth_pred`` with ``classify=True``, and ``losses/sigloss.py``): the patch tokens of the last
block (``blocks: 1``) or of the last four (``blocks: 4``), each with its class token
concatenated (``cls_token``; encoders without one read the patch tokens alone), a BatchNorm and a
1 x 1 convolution to ``n_bins`` logits, turned into depth by the classification-regression of
AdaBins (Bhat et al., CVPR 2021: uniform bins between ``min_depth`` and ``max_depth``, "linear"
normalisation ``relu(logit) + 0.1`` divided by its sum, depth = the bins weighted by it),
upsampled bilinearly to the label size and trained with the scale-invariant log loss of Eigen et
al. (NeurIPS 2014) as DINOv2 writes it, ``sqrt(var(g) + 0.15 * mean(g)^2)``,
``g = log(pred + 1e-3) - log(gt + 1e-3)`` over the pixels with ground truth. A grid of
learning rates is trained in one pass; the lr is chosen on a held-out part of train (by RMSE)
and reported on val.

Data: the split-file layout of BTS (Lee et al., 2019) and of the Monocular Depth Estimation
Toolbox DINOv2 evaluates with (``depth/datasets/nyu.py``): a root holding ``nyu_train.txt`` and
``nyu_test.txt``, one ``<rgb> <depth> [<focal>]`` line per image with paths relative to the root,
RGB images and 16-bit PNG depth maps in millimetres (``depth_scale`` 1000). The synthetic copy
is :mod:`harness.core.data.shapes_depth`'s. Metrics (the toolbox's, computed per image on the
pixels with ``min_depth < gt < max_depth`` and, for 480 x 640 maps, inside Eigen's crop
``[45:471, 41:601]``, then averaged over images): ``rmse`` (m), ``abs_rel``, and ``delta1`` /
``delta2`` / ``delta3``, the percentage of pixels with ``max(pred / gt, gt / pred)`` below
1.25, 1.25^2, 1.25^3.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from harness.core.config import DataConfig, TaskConfig
from harness.core.data.datasets import DatasetError
from harness.core.data.shapes import ShapesSpec
from harness.core.data.shapes_depth import DEPTH_SCALE, NYU_SPLIT_FILES, ensure_shapes_depth

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .dense_probe import (
    BNConvHead,
    DenseSplit,
    TokenMaps,
    holdout_split,
    make_heads,
    predict_maps,
    resize_targets,
    train_heads,
    upsample,
    use_cache,
)
from .features import frozen_forward_step

EIGEN_CROP = (45, 471, 41, 601)  # rows, columns of the 480 x 640 NYU maps (the toolbox's)
_LAYOUT = ("an NYU-Depth v2 root holds nyu_train.txt and nyu_test.txt, one '<rgb> <depth> "
           "[<focal>]' line per image (paths relative to the root), RGB images and 16-bit PNG "
           "depth maps in millimetres")  # fmt: skip


class LinearDepthConfig(TaskConfig):
    """Linear depth probe (see :mod:`downstream.depth_probe`).

    Attributes:
        blocks: Last blocks read: 1 (DINOv2 "lin. 1") or 4 ("lin. 4").
        cls_token: Concatenate each block's class token to its patch tokens (DINOv2).
        n_bins: Depth bins of the classification-regression head.
        min_depth: Smallest depth (m): the first bin, and the evaluation's lower bound.
        max_depth: Largest depth (m): the last bin, and the evaluation's upper bound.
        eigen_crop: Score 480 x 640 maps inside Eigen's crop only.
        lrs: AdamW learning rates of the grid.
        weight_decay: AdamW weight decay.
        epochs: Passes over the train part.
        batch_size: Images per step.
        holdout_fraction: Part of train held out to choose the lr.
        label_size: Side of the train depth maps (nearest resize; None: the encoder's
            img_size); val is scored at each map's own size.
        feature_source: ``cache`` / ``online`` / ``auto`` as :class:`LinearSegConfig`'s.
        cache_max_gb: Largest in-memory cache ``auto`` builds.
        batch_size_extract: Batch of the frozen forward passes and of the evaluation.
    """

    name: Literal["linear_depth"] = "linear_depth"
    blocks: Literal[1, 4] = 1
    cls_token: bool = True
    n_bins: int = Field(256, ge=2)
    min_depth: float = Field(1e-3, gt=0)
    max_depth: float = Field(10.0, gt=0)
    eigen_crop: bool = True
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=2)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_size: int | None = Field(None, ge=8)
    feature_source: Literal["auto", "cache", "online"] = "auto"
    cache_max_gb: float = Field(8.0, ge=0)
    batch_size_extract: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> LinearDepthConfig:
        if self.max_depth <= self.min_depth:
            raise ValueError(f"max_depth ({self.max_depth}) must exceed min_depth ({self.min_depth})")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be > 0, got {self.lrs}")
        return self


# --------------------------------------------------------------------------- data


def resolve_nyu_root(data: DataConfig) -> Path:
    """The NYU-layout root ``data`` names: ``shapes`` (the synthetic depth copy, generated into
    the cache), the root itself, or its ``nyu_depth_v2`` / ``nyu`` folder."""
    if data.source == "shapes":
        return ensure_shapes_depth(ShapesSpec(**data.shapes.model_dump()))
    root = Path(data.source).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset path {root} does not exist: set data.source to an NYU-Depth "
                           f"v2 root ({_LAYOUT}), or to 'shapes'")  # fmt: skip
    for cand in (root, root / "nyu_depth_v2", root / "nyu"):
        if (cand / NYU_SPLIT_FILES["train"]).is_file():
            return cand
    return root


def nyu_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(rgb, depth)`` paths listed by the split file of ``split`` (``train`` / ``val``).

    Raises:
        DatasetError: A missing split file, a malformed line, or listed files that are not there
            (how many and the first few).
    """
    listing = root / NYU_SPLIT_FILES[split]
    if not listing.is_file():
        raise DatasetError(f"split file {listing} is missing: {_LAYOUT}")
    pairs, missing = [], []
    for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetError(f"{listing} line {n} ('{line}') names no depth map: {_LAYOUT}")
        if parts[1] == "None":  # the toolbox skips images without depth
            continue
        rgb, depth = (root / p.lstrip("/\\") for p in parts[:2])
        missing += [str(p) for p in (rgb, depth) if not p.is_file()]
        pairs.append((rgb, depth))
    if missing:
        raise DatasetError(f"{len(missing)} file(s) listed in {listing} are missing (e.g. "
                           f"{', '.join(missing[:3])})")  # fmt: skip
    if not pairs:
        raise DatasetError(f"{listing} lists no image: {_LAYOUT}")
    return pairs


def check_nyu(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """Check an NYU-layout root from the file headers (no pixel decoded): every listed file
    present, every depth map a 16-bit PNG of its RGB image's size.

    Raises:
        DatasetError: Naming the split file, the depth map, its size and the expected size.
    """
    out = {}
    for split in ("train", "val"):
        pairs = nyu_pairs(root, split)
        for rgb, depth in pairs:
            try:
                with Image.open(rgb) as im, Image.open(depth) as dm:
                    size, dsize, mode = im.size, dm.size, dm.mode
            except (OSError, ValueError) as exc:
                raise DatasetError(f"cannot read {rgb} or {depth} ({type(exc).__name__}: {exc})") from None
            if dsize != size:
                raise DatasetError(
                    f"depth map {depth} is {dsize[0]}x{dsize[1]} (width x height) but its image "
                    f"{rgb.name} is {size[0]}x{size[1]}: expected a {size[0]}x{size[1]} depth map"
                )
            if mode not in ("I;16", "I;16B", "I", "I;16L"):
                raise DatasetError(f"depth map {depth} has PIL mode {mode}, expected a 16-bit PNG "
                                   "in millimetres")  # fmt: skip
        out[split] = pairs
    return out


def read_depth(path: Path) -> np.ndarray:
    """A 16-bit PNG depth map in metres (value / :data:`DEPTH_SCALE`; 0 = no measurement)."""
    return np.asarray(Image.open(path), dtype=np.float32) / DEPTH_SCALE


# --------------------------------------------------------------------------- head, loss, metrics


class BinnedDepthHead(nn.Module):
    """BatchNorm + 1 x 1 conv to ``n_bins`` logits, then AdaBins' linear normalisation over
    uniform bins (DINOv2's ``depth_pred`` with ``classify=True``, ``UD``, ``linear``):
    ``[B, C, h, w] -> [B, 1, h, w]`` depth in metres."""

    def __init__(self, channels: int, n_bins: int, min_depth: float, max_depth: float) -> None:
        super().__init__()
        self.logits = BNConvHead(channels, n_bins)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.relu(self.logits(x)) + 0.1
        p = p / p.sum(dim=1, keepdim=True)  # [B, n_bins, h, w]
        return torch.einsum("bkhw,k->bhw", p, self.bins)[:, None]


def sig_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Scale-invariant log loss over the pixels with ``gt > 0`` (pred ``[B, 1, H, W]``, gt
    ``[B, H, W]``), DINOv2's ``SigLoss``: ``sqrt(var(g) + 0.15 * mean(g)^2)``."""
    valid = gt > 0
    g = torch.log(pred[:, 0][valid] + 1e-3) - torch.log(gt[valid] + 1e-3)
    if g.numel() < 2:
        return pred.sum() * 0.0
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


def eval_mask(gt: torch.Tensor, min_depth: float, max_depth: float, eigen_crop: bool) -> torch.Tensor:
    """Pixels scored: ``min_depth < gt < max_depth``, inside Eigen's crop for a 480 x 640 map."""
    mask = (gt > min_depth) & (gt < max_depth)
    if eigen_crop and tuple(gt.shape) == (480, 640):
        crop = torch.zeros_like(mask)
        r0, r1, c0, c1 = EIGEN_CROP
        crop[r0:r1, c0:c1] = True
        mask &= crop
    return mask


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """``rmse``, ``abs_rel``, ``delta1..3`` (percent) of one image's scored pixels (1-D)."""
    pred, gt = pred.double(), gt.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    return {
        "rmse": float(torch.sqrt(((gt - pred) ** 2).mean())),
        "abs_rel": float(((gt - pred).abs() / gt).mean()),
        **{f"delta{i}": float((thresh < 1.25**i).double().mean() * 100) for i in (1, 2, 3)},
    }


def mean_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """The mean over images of each metric (the toolbox's ``nanmean``)."""
    keys = ("rmse", "abs_rel", "delta1", "delta2", "delta3")
    return {k: float(np.nanmean([m[k] for m in per_image])) if per_image else float("nan")
            for k in keys}  # fmt: skip


# --------------------------------------------------------------------------- the task


@register_task("linear_depth")
class LinearDepth(Task):
    """Linear depth probe (see the module docstring)."""

    name = "linear_depth"
    version = 1
    metrics = {"rmse": False, "abs_rel": False, "delta1": True, "delta2": True, "delta3": True}
    config_cls = LinearDepthConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """NYU-Depth v2's layout (:func:`check_nyu`)."""
        check_nyu(resolve_nyu_root(data))

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the heads then train on cached token maps)."""
        return frozen_forward_step(encoder, batch)

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearDepthConfig)
        t0 = time.time()
        if cfg.blocks > encoder.num_feature_blocks:
            raise ValueError(f"blocks: {cfg.blocks} needs {cfg.blocks} readable blocks; "
                             f"{type(encoder).__name__} has {encoder.num_feature_blocks}")  # fmt: skip
        root = resolve_nyu_root(ctx.data)
        pairs = check_nyu(root)
        train, val = DenseSplit(pairs["train"], read_depth), DenseSplit(pairs["val"], read_depth)
        encoder.to(ctx.device).eval()
        with_cls = cfg.cls_token and encoder.num_prefix_tokens > 0
        channels = cfg.blocks * int(encoder.num_features) * (2 if with_cls else 1)
        cache = use_cache(cfg.feature_source, len(train) + len(val), channels,
                          encoder.feature_grid, cfg.cache_max_gb)  # fmt: skip
        m_tr = TokenMaps(encoder, train, cfg.blocks, with_cls, ctx.device, cache,
                         cfg.batch_size_extract)  # fmt: skip
        m_va = TokenMaps(encoder, val, cfg.blocks, with_cls, ctx.device, cache,
                         cfg.batch_size_extract)  # fmt: skip
        t_feat = time.time() - t0
        size = cfg.label_size or int(encoder.cfg.img_size)
        y_tr = resize_targets(train, size)
        fit, hold = holdout_split(len(train), cfg.holdout_fraction, ctx.seed)
        heads = make_heads(lambda: BinnedDepthHead(channels, cfg.n_bins, cfg.min_depth,
                                                   cfg.max_depth),
                           cfg.lrs, cfg.weight_decay, ctx.seed, "linear_depth", ctx.device)  # fmt: skip
        t1 = time.time()
        losses = train_heads(heads, m_tr, y_tr, fit, cfg.epochs, cfg.batch_size, ctx.seed,
                             sig_loss)  # fmt: skip
        t_train = time.time() - t1
        models = [h.model for h in heads]
        on_hold = self._scores(models, m_tr, train, hold.tolist(), cfg)
        on_val = self._scores(models, m_va, val, list(range(len(val))), cfg)
        table = [{"lr": h.lr, **{f"holdout_{k}": v for k, v in ho.items()},
                  **{f"val_{k}": v for k, v in va.items()}}
                 for h, ho, va in zip(heads, on_hold, on_val, strict=True)]  # fmt: skip
        i = min(range(len(table)), key=lambda j: table[j]["holdout_rmse"])
        best = on_val[i]
        ctx.log(f"[linear_depth] blocks {cfg.blocks}{' + cls' if with_cls else ''}: lr "
                f"{heads[i].lr:g} (holdout RMSE {table[i]['holdout_rmse']:.3f}) -> val RMSE "
                f"{best['rmse']:.3f} abs rel {best['abs_rel']:.3f} delta1 {best['delta1']:.1f} "
                f"({time.time() - t0:.1f}s)")  # fmt: skip
        return TaskResult(
            metrics=best,
            details={"best_lr": heads[i].lr, "holdout_rmse": table[i]["holdout_rmse"],
                     "heads": table, "blocks": cfg.blocks, "cls_token": with_cls,
                     "num_train": len(fit), "num_holdout": len(hold), "num_val": len(val),
                     "label_size": size, "feature_source": "cache" if cache else "online",
                     "feature_cache_bytes": m_tr.nbytes + m_va.nbytes,
                     "loss_first": losses[0] if losses else None,
                     "loss_last": losses[-1] if losses else None, "feature_seconds": t_feat,
                     "head_seconds": t_train, "total_seconds": time.time() - t0},
        )  # fmt: skip

    @staticmethod
    def _scores(models: list[nn.Module], maps: TokenMaps, split: DenseSplit, idx: list[int],
                cfg: LinearDepthConfig) -> list[dict[str, float]]:  # fmt: skip
        """Per-head metrics averaged over the images ``idx`` (predictions at each map's size)."""
        per: list[list[dict[str, float]]] = [[] for _ in models]

        def each(k: int, s: int, out: torch.Tensor) -> None:
            gt = split.target(s)
            pred = upsample(out[None], tuple(gt.shape))[0, 0].cpu()
            mask = eval_mask(gt, cfg.min_depth, cfg.max_depth, cfg.eigen_crop)
            if mask.any():
                per[k].append(depth_metrics(pred[mask].clamp(cfg.min_depth, cfg.max_depth), gt[mask]))

        predict_maps(models, maps, idx, cfg.batch_size_extract, each)
        return [mean_metrics(p) for p in per]
