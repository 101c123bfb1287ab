"""Linear probing of frozen encoders: the fast probe, and the pieces it shares with MAE's
faithful protocol (:mod:`downstream.linear_probe_faithful`, optimized with
:class:`downstream.lars.LARS`).

The head is MAE's linear-probe head (He et al., CVPR 2022, appendix A.2): BatchNorm without
affine parameters (eps 1e-6) before a linear classifier initialized with std 0.01.

* ``linear_probe`` (fast): features are extracted once (optionally with K augmented views per
  image) and cached on disk by :mod:`downstream.features`; then a grid of heads, learning rates x
  pooling x last-k blocks as in DINOv2's linear evaluation (Oquab et al., 2023), is trained
  together in one pass over the cached features: every head sees the same batches, heads on the
  same input share the (affine-free) BatchNorm. SGD with momentum, a cosine schedule, no weight
  decay; learning rates are base rates scaled by ``batch / 256``. The head is chosen on a
  held-out, class-stratified part of train, never on val; the record says which head won and
  lists every head's numbers. A winner on an edge of a numeric grid axis (the lowest or highest
  lr, ...) means the grid may be too narrow: the log warns, the record lists it
  (``details.grid_edge``, :func:`grid_edges`) and the leaderboard marks the cell.
* ``linear_probe_faithful``: MAE's protocol end to end (see :mod:`downstream.linear_probe_faithful`).

``mimbench bench-probe`` (:mod:`downstream.bench_probe`) runs both on the same encoder and data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from downstream.classifier import SavedClassifier, register_classifier, save_classifier
from downstream.features import encoder_fingerprint, get_features
from harness.core.config import DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import (
    check_classification_data,
    eval_transform,
    imagefolder_checked,
    pretrain_transform,
    resolve_imagefolder_root,
)
from harness.core.training import autocast_dtype
from pretrain.encoders.base import Encoder

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .features import frozen_forward_step

#: The fast probe's default base learning rates (version 3; version 2 had 0.01 ... 1.0).
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)

#: The head grid's numeric axes (``heads`` table column -> the config key that sets it).
GRID_AXES: dict[str, str] = {"lr": "lrs", "last_blocks": "last_blocks"}


def grid_edges(
    heads: list[dict[str, Any]],
    score: str,
    axes: dict[str, str] = GRID_AXES,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """The grid axes on which the best heads sit on an edge (the grid may be too narrow there).

    An axis with at least two values is on an edge when every head reaching the best ``score``
    has the axis' lowest value, or every one its highest (a tie that also reaches an interior
    value is not an edge). A value at its ceiling (``last_blocks`` = the encoder's depth) cannot
    be widened and is not reported.

    Args:
        heads: One row per head, with the axis values and ``score``.
        score: The column the winner is chosen by (higher is better).
        axes: Axis column -> the config key that sets its values (for the message).
        bounds: Axis column -> the smallest and largest values the axis can take, if bounded.

    Returns:
        Per edge: ``{"axis", "value", "edge": "lowest" | "highest", "grid", "message"}``.
    """
    best = max(h[score] for h in heads)
    winners = [h for h in heads if h[score] == best]
    edges = []
    for axis, key in axes.items():
        grid = sorted({h[axis] for h in heads})
        won = {h[axis] for h in winners}
        if len(grid) < 2:
            continue
        for edge, value in (("lowest", grid[0]), ("highest", grid[-1])):
            if won != {value} or value in (bounds or {}).get(axis, ()):
                continue
            grid_text = ", ".join(f"{v:g}" for v in grid)
            edges.append({
                "axis": axis, "value": value, "edge": edge, "grid": grid,
                "message": f"the winning head's {axis} {value:g} is the {edge} of the grid "
                           f"[{grid_text}]: the grid may be too narrow; widen task.{key}",
            })  # fmt: skip
    return edges


class LinearProbeConfig(TaskConfig):
    """Fast linear probe on cached frozen features (see :mod:`downstream.linear_probe`).

    A grid of heads (``pooling`` x ``last_blocks`` x ``lrs``), each MAE's probe head, is trained
    together on features extracted once; the head is chosen on a held-out part of train.

    Attributes:
        pooling: Inputs of the heads: ``cls`` (class token), ``avg`` (mean patch token),
            ``cls_avg`` (both, DINOv2's ``avgpool``). Encoders without a class token (Swin) keep
            ``avg`` only.
        last_blocks: Concatenate the chosen token of the last k blocks, each after the final
            norm (DINOv2: 1 and 4). Clipped to the encoder's depth.
        lrs: Base learning rates (scaled by ``batch_size / 256``). The default spans 1e-3 to 30
            in steps of about 3x: MAE's linear probe uses LARS at base lr 0.1 (He et al., 2022,
            appendix A.2), DINOv2's grid (``dinov2/eval/linear.py``) runs from 1e-5 to 0.1 without
            a BatchNorm, and the fast probe's winners of the 5-value grid of version 2
            (0.01 ... 1.0) sat at its top, 1.0, for all three demo encoders.
        epochs: Passes over the cached features.
        batch_size: Head training batch.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (0: DINOv2, MAE).
        holdout_fraction: Part of train (per class) held out to choose the head.
        train_views: 1: the center crop of each image only; K > 1: plus K - 1 random augmented
            views (RandomResizedCrop + flip), one drawn per image and epoch.
        batch_size_extract: Batch of the feature extraction.
        cache_features: Read / write the on-disk feature cache.
        cache_dir: Feature cache directory (default ``$MIMBENCH_CACHE/features``).
        cache_dtype: Storage dtype of cached features (``float16`` halves memory on ImageNet).
        strict_data: Unreadable image files are fatal instead of skipped and counted.
        block: Read this one block (0-based; negative counts from the last), through the final
            norm, instead of the last ones: iGPT's probe of a middle block (Chen et al. 2020,
            Sec. 4.2: the best features lie mid-network), any isotropic encoder. ``last_blocks``
            must then be ``[1]``. Left out of the hash while unset.
    """

    name: Literal["linear_probe"] = "linear_probe"
    pooling: list[Literal["cls", "avg", "cls_avg"]] = Field(
        default_factory=lambda: ["cls", "avg", "cls_avg"], min_length=1
    )
    last_blocks: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: list(DEFAULT_LRS), min_length=1)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    momentum: float = 0.9
    weight_decay: float = Field(0.0, ge=0)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    train_views: int = Field(1, ge=1)
    batch_size_extract: int = Field(128, ge=1)
    cache_features: bool = True
    cache_dir: str | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    strict_data: bool = False
    block: int | None = None

    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ("block",)  # added after hashes were kept

    @model_validator(mode="after")
    def _positive_blocks(self) -> LinearProbeConfig:
        if any(k < 1 for k in self.last_blocks):
            raise ValueError(f"last_blocks must be >= 1, got {self.last_blocks}")
        if self.block is not None and self.last_blocks != [1]:
            raise ValueError(
                f"block {self.block} reads one block, so last_blocks {self.last_blocks} cannot "
                "apply: set last_blocks: [1] (or leave block unset)"
            )
        return self


# --------------------------------------------------------------------------- shared pieces


def stratified_holdout(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (fit, holdout), taking ``fraction`` of every class (at least one)."""
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        hold.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


class ProbeHead(nn.Module):
    """MAE's probe head: BatchNorm1d(affine=False, eps=1e-6) then Linear (std 0.01 init).

    Args:
        dim: Input width.
        num_classes: Output classes.
        bn: A BatchNorm to share with other heads on the same input (affine-free, so sharing
            changes nothing but the cost).
    """

    def __init__(self, dim: int, num_classes: int, bn: nn.BatchNorm1d | None = None) -> None:
        super().__init__()
        self.bn = bn if bn is not None else nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest logits."""
    if y.numel() == 0:
        return 0.0
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == y.unsqueeze(1)).any(dim=1)
    return 100.0 * hit.float().mean().item()


def train_heads(
    feats: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    cfg: LinearProbeConfig,
    seed: int,
    device: torch.device | None = None,
) -> dict[tuple[str, float], ProbeHead]:
    """Train one head per (input, lr) on the same batches of cached features.

    The heads of one input share its (affine-free) BatchNorm and are stacked into one weight
    tensor ``[H, C, D]``, so a step costs one matmul per input; each head keeps its own learning
    rate in an SGD-with-momentum update written out here (PyTorch's SGD rule:
    ``buf = m * buf + g + wd * w``, ``w -= lr * buf``).

    Args:
        feats: ``{input name: [N, D]}``, or ``[N, V, D]`` for V views (one view is drawn per
            sample and epoch).
        labels: ``[N]``.
        num_classes: Classes.
        cfg: Epochs, batch, lrs, momentum, weight decay.
        seed: Seeds the init, the batch order and the view draws.
        device: Where the heads train (features are moved batch by batch).

    Returns:
        ``{(input name, lr): head}`` in eval mode, on CPU.
    """
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    n = labels.shape[0]
    bs = min(cfg.batch_size, n)
    lrs = torch.tensor([lr * bs / 256 for lr in cfg.lrs], device=device)  # [H]
    n_heads = len(cfg.lrs)
    bns: dict[str, nn.BatchNorm1d] = {}
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, x in feats.items():
        dim = x.shape[-1]
        bns[name] = nn.BatchNorm1d(dim, affine=False, eps=1e-6).to(device).train()
        w = torch.empty(n_heads, num_classes, dim, device=device)
        nn.init.trunc_normal_(w, std=0.01)
        weights[name] = (
            w.requires_grad_(),
            torch.zeros(n_heads, num_classes, device=device, requires_grad=True),
        )
    bufs = {name: (torch.zeros_like(w), torch.zeros_like(b)) for name, (w, b) in weights.items()}
    steps_per_epoch = max(1, n // bs)
    total = cfg.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed + 1)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        view_draw = {
            name: torch.randint(0, x.shape[1], (n,), generator=g)
            for name, x in feats.items()
            if x.ndim == 3
        }
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            y = labels[idx].to(device).repeat_interleave(n_heads)  # [B * H]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            loss = torch.zeros((), device=device)
            for name, x in feats.items():
                xb = x[idx, view_draw[name][idx]] if x.ndim == 3 else x[idx]
                z = bns[name](xb.to(device, torch.float32))  # [B, D], shared by the heads
                w, b = weights[name]
                logits = torch.einsum("bd,hcd->bhc", z, w) + b  # [B, H, C]
                loss = loss + F.cross_entropy(logits.reshape(-1, num_classes), y) * n_heads
            grads = torch.autograd.grad(loss, [t for pair in weights.values() for t in pair])
            with torch.no_grad():
                for (name, (w, b)), gw, gb in zip(
                    weights.items(), grads[0::2], grads[1::2], strict=True
                ):
                    for p_, gp, buf in ((w, gw, bufs[name][0]), (b, gb, bufs[name][1])):
                        if cfg.weight_decay:
                            gp = gp + cfg.weight_decay * p_
                        buf.mul_(cfg.momentum).add_(gp)
                        p_.sub_((lrs * scale).view(-1, *([1] * (p_.ndim - 1))) * buf)
            step += 1
    heads: dict[tuple[str, float], ProbeHead] = {}
    for name, (w, b) in weights.items():
        bn = bns[name].eval().cpu()
        for h, lr in enumerate(cfg.lrs):
            head = ProbeHead(w.shape[-1], num_classes, bn)
            with torch.no_grad():
                head.fc.weight.copy_(w[h])
                head.fc.bias.copy_(b[h])
            heads[(name, lr)] = head.eval()
    return heads


# --------------------------------------------------------------------------- fast mode


@register_task("linear_probe")
class LinearProbe(Task):
    """Fast linear probe (see the module docstring).

    Version 2: cached features (optionally several views), ``last_blocks`` and ``cls_avg`` in
    the grid, unreadable images skipped and counted. Version 3: the default lr grid widened from
    0.01 ... 1.0 to 0.001 ... 30 (:data:`DEFAULT_LRS`), a winner on a grid edge reported.
    """

    name = "linear_probe"
    version = 3
    metrics = {"top1": True, "top5": True}
    config_cls = LinearProbeConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass: the features are extracted once and cached, the heads then
        train on cached vectors (negligible)."""
        return frozen_forward_step(encoder, batch)

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """Features of every train image in ``train_views`` views and of every val image (the
        heads' training on cached features is not counted)."""
        assert isinstance(cfg, LinearProbeConfig)
        return cfg.train_views * n_train + n_val

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearProbeConfig)

        t0 = time.time()
        root = resolve_imagefolder_root(ctx.data)
        img = int(encoder.cfg.img_size)
        tf = eval_transform(img, ctx.data.eval_crop_pct)
        aug = probe_train_transform(img, (0.08, 1.0), True) if cfg.train_views > 1 else None
        strict = cfg.strict_data or ctx.data.strict_data
        train = imagefolder_checked(root, "train", None, strict)
        val = imagefolder_checked(root, "val", None, strict)
        num_classes = len(train.classes)
        poolings = [p for p in cfg.pooling if p == "avg" or "cls" in encoder.poolings]
        if not poolings:
            raise ValueError(f"{type(encoder).__name__} has no class token: set pooling to [avg]")
        ks = sorted({min(k, encoder.num_feature_blocks) for k in cfg.last_blocks})
        dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
        ehash = encoder_fingerprint(encoder) if cfg.cache_features else None
        common = dict(
            n_blocks=max(ks),
            device=ctx.device,
            cache_dir=cfg.cache_dir,
            use_cache=cfg.cache_features,
            dtype=dtype,
            batch_size=cfg.batch_size_extract,
            num_workers=ctx.data.num_workers,
            log=ctx.log,
            encoder_hash=ehash,
            seed=ctx.seed,
            block=cfg.block,
        )
        ftr = get_features(encoder, train, "train", tf, views=cfg.train_views, aug_tf=aug, **common)
        fva = get_features(encoder, val, "val", tf, **common)
        t_feat = time.time() - t0
        fit, hold = stratified_holdout(ftr.labels, cfg.holdout_fraction, ctx.seed)
        inputs = {f"{p}/last{k}": (p, k) for p in poolings for k in ks}
        train_in = {}
        for name, (p, k) in inputs.items():
            x = ftr.select(p, k)[fit]  # [N, V, D]
            train_in[name] = x if x.shape[1] > 1 else x[:, 0]
        t1 = time.time()
        heads = train_heads(train_in, ftr.labels[fit], num_classes, cfg, ctx.seed, ctx.device)
        t_heads = time.time() - t1

        table = []
        with torch.no_grad():
            for (name, lr), h in heads.items():
                p, k = inputs[name]
                xh = ftr.select(p, k, views=1)[hold, 0].float()
                xv = fva.select(p, k, views=1)[:, 0].float()
                lv = h(xv)
                table.append(
                    {
                        "pooling": p,
                        "last_blocks": k,
                        "lr": lr,
                        "holdout_top1": topk_accuracy(h(xh), ftr.labels[hold], 1),
                        "val_top1": topk_accuracy(lv, fva.labels, 1),
                        "val_top5": topk_accuracy(lv, fva.labels, 5),
                    }
                )
        best = max(table, key=lambda r: r["holdout_top1"])  # first of ties: grid order
        ctx.log(
            f"[linear_probe] best head pooling={best['pooling']} last_blocks={best['last_blocks']} "
            f"lr={best['lr']} holdout {best['holdout_top1']:.1f} -> val top1 {best['val_top1']:.2f}"
        )
        chosen = heads[(f"{best['pooling']}/last{best['last_blocks']}", best["lr"])]
        save_classifier(ctx.out_dir, SavedClassifier(
            "linear_probe", list(train.classes),
            {"pooling": best["pooling"], "last_blocks": best["last_blocks"]},
            chosen.state_dict()))  # fmt: skip
        edges = grid_edges(table, "holdout_top1",
                           bounds={"last_blocks": (1, encoder.num_feature_blocks)})
        for edge in edges:
            ctx.log(f"[linear_probe] WARNING: {edge['message']}")
        return TaskResult(
            metrics={"top1": best["val_top1"], "top5": best["val_top5"]},
            details={
                "best_head": {
                    "pooling": best["pooling"],
                    "last_blocks": best["last_blocks"],
                    "lr": best["lr"],
                },
                "holdout_top1": best["holdout_top1"],
                "grid_edge": edges,
                "heads": table,
                "num_classes": num_classes,
                "num_train": len(fit),
                "num_holdout": len(hold),
                "num_val": int(fva.labels.numel()),
                "train_views": ftr.num_views,
                "skipped_images": {"train": ftr.num_skipped, "val": fva.num_skipped},
                "feature_cache": {
                    "train": ftr.from_cache,
                    "val": fva.from_cache,
                    "dir": str(ftr.path.parent) if ftr.path else None,
                },
                "feature_seconds": t_feat,
                "head_seconds": t_heads,
                "total_seconds": time.time() - t0,
            },
        )


class LinearProbeClassifier(nn.Module):
    """The frozen encoder and a saved probe head: the head's input computed from the images as
    :meth:`downstream.features.Features.select` reads it from cached features (the pooled
    token of each of the last ``last_blocks`` blocks, oldest first; ``cls_avg`` adds the last
    block's average patch token), under the extraction's autocast.

    Args:
        encoder: The frozen encoder.
        head: The probe head.
        pooling: ``cls``, ``avg`` or ``cls_avg``.
        last_blocks: Blocks whose pooled tokens are concatenated.
    """

    def __init__(self, encoder: Encoder, head: ProbeHead, pooling: str, last_blocks: int) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.pooling, self.last_blocks = pooling, last_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        amp = autocast_dtype("auto", x.device)
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            blocks = enc.last_blocks(x, self.last_blocks)  # k x [B, T, D]
        p = "cls" if self.pooling == "cls_avg" else self.pooling
        z = torch.stack([enc.pool(t, p) for t in blocks], dim=1).flatten(1)  # [B, k * D]
        if self.pooling == "cls_avg":
            z = torch.cat([z, enc.pool(blocks[-1], "avg")], dim=1)  # [B, (k + 1) * D]
        return self.head(z.float())


@register_classifier("linear_probe")
def linear_probe_classifier(encoder: Encoder, saved: SavedClassifier) -> nn.Module:
    """The fast linear probe's chosen head on ``encoder`` (:class:`LinearProbeClassifier`)."""
    weight = saved.state["fc.weight"]  # [C, D']
    head = ProbeHead(int(weight.shape[1]), int(weight.shape[0]))
    head.load_state_dict(saved.state)
    return LinearProbeClassifier(encoder, head, saved.spec["pooling"],
                                 int(saved.spec["last_blocks"]))  # fmt: skip


def probe_train_transform(img_size: int, crop_scale: tuple[float, float], hflip: bool) -> Any:
    """MAE's linear-probe augmentation: RandomResizedCrop (bicubic) + flip + normalize."""

    return pretrain_transform(img_size, crop_scale, hflip)
