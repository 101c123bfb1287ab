"""Frozen dense probes on ADE20K's layout: a linear segmentation head and kNN segmentation.

Minutes-cheap next to UperNet fine-tuning (:mod:`downstream.segmentation`), pure torch, and so
usable inside sweeps. Both read the patch tokens of the frozen encoder (after its final norm) on
the whole image resized to the encoder's square input (no crop, so the token grid covers the
label map); predictions are upsampled bilinearly to each val label map's own size and scored
there. Labels follow ADE20K's ``reduce_zero_label`` (0 ignored, 1..K -> 0..K-1, 255 ignored),
read by :func:`downstream.segmentation.ade_pairs` / :func:`~downstream.segmentation.check_ade`.

* ``linear_seg``: DINOv2's linear segmentation probe (Oquab et al., "DINOv2: Learning Robust
  Visual Features without Supervision", TMLR 2024, Sec. 7.4, "linear" and "+ms";
  ``facebookresearch/dinov2`` ``dinov2/eval/segmentation/models/decode_heads/linear_head.py``,
  ``BNHead``): a BatchNorm over the patch tokens of the last block (``blocks: 1``, "linear") or
  of the last four blocks concatenated (``blocks: 4``, the "+ms" input; its multi-scale
  test-time augmentation is not done here), a 1 x 1 convolution to the classes, bilinear
  upsampling to the label size, cross-entropy ignoring 255. Unlike DINOv2's evaluation, which
  reports its head on val, a grid of learning rates is trained in one pass over the same batches
  and the head is chosen on a held-out part of train (``holdout_fraction``), then reported on
  val: ``miou`` and ``aacc``; the record names the winner and lists every head.
* ``knn_seg``: dense nearest-neighbour retrieval (Balazevic et al., "Towards In-context Scene
  Understanding", NeurIPS 2023, "Hummingbird", Sec. 2): the last block's patch tokens of the
  train images form a memory bank, each with a soft label, the class distribution of the pixels
  under the patch (``patch_labels: soft``, Hummingbird's; ``majority``: the one-hot of its most
  frequent class); each val patch takes the softmax(cosine / ``temperature``)-weighted average of
  the labels of its ``k`` most cosine-similar bank patches; the class maps are upsampled to the
  label size and the argmax scored (``miou``, ``aacc``).

mIoU is mmseg's ``IoUMetric``: intersections and unions summed over the whole val set per class,
IoU averaged over the classes with a non-empty union; aAcc is the share of labelled pixels
predicted right (both 0-100).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, model_validator
from torch import nn

from harness.core.config import DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetError
from harness.core.training import autocast_dtype, lr_at
from pretrain.encoders.base import Encoder

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .features import frozen_forward_step
from .segmentation import IGNORE_INDEX, ade_pairs, check_ade, resolve_ade_root

# --------------------------------------------------------------------------- data


@dataclass
class DenseSplit:
    """Image / target file pairs of one split and how to read a target.

    Attributes:
        pairs: ``(image path, target path)`` per sample.
        read_target: Target file -> ``[H, W]`` array (seg: int64 class ids with 255 ignored;
            depth: float32 metres).
    """

    pairs: list[tuple[Path, Path]]
    read_target: Callable[[Path], np.ndarray]

    def __len__(self) -> int:
        return len(self.pairs)

    def image(self, i: int, size: int) -> torch.Tensor:
        """Image ``i`` resized (bicubic, aspect not kept) to ``size`` and normalized, ``[3, S, S]``."""
        path = self.pairs[i][0]
        try:
            img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return (x - mean) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def target(self, i: int) -> torch.Tensor:
        """Target ``i`` at its own size, ``[H, W]``."""
        return torch.from_numpy(self.read_target(self.pairs[i][1]))


def read_ade_label(path: Path) -> np.ndarray:
    """An ADE20K label map with ``reduce_zero_label``: 0 -> 255, v -> v - 1, 255 stays."""
    try:
        raw = np.asarray(Image.open(path), dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read label map {path} ({type(exc).__name__}: {exc})") from None
    out = raw - 1
    out[(raw == 0) | (raw == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def ade_split(root: Path, split: str) -> DenseSplit:
    """The ADE20K split ``train`` / ``val`` of ``root`` (checked by :func:`check_ade` first)."""
    return DenseSplit(ade_pairs(root, split), read_ade_label)


def resize_targets(split: DenseSplit, size: int) -> torch.Tensor:
    """Every target of ``split`` resized (nearest) to ``size`` x ``size``, ``[N, S, S]``."""
    out = []
    for i in range(len(split)):
        t = split.target(i)[None, None].float()
        out.append(F.interpolate(t, size=(size, size), mode="nearest")[0, 0])
    return torch.stack(out)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, hold)`` sample indices: a seeded ``fraction`` of ``n`` images held out (>= 1)."""
    if n < 2:
        raise DatasetError(f"the train split has {n} image(s): a held-out part needs at least 2")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 104_729 + 17))
    k = min(n - 1, max(1, round(fraction * n)))
    return perm[k:].sort().values, perm[:k].sort().values


# --------------------------------------------------------------------------- features


@torch.no_grad()
def token_maps(encoder: Encoder, x: torch.Tensor, n_blocks: int, with_cls: bool = False) -> torch.Tensor:
    """Patch tokens of the last ``n_blocks`` blocks (final norm) of the frozen ``encoder`` as maps,
    concatenated on channels (blocks in depth order), ``[B, n * D (+ n * D with_cls), h, w]``
    float32; ``with_cls`` appends each block's class token broadcast over the grid (DINOv2's
    depth input)."""
    encoder.eval()
    amp = autocast_dtype("auto", x.device)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        blocks = encoder.last_blocks(x, n_blocks)  # n x [B, P + T, D]
    h, w = encoder.feature_grid
    p = encoder.num_prefix_tokens
    maps = []
    for t in blocks:
        t = t.float()
        maps.append(t[:, p:].transpose(1, 2).reshape(t.shape[0], -1, h, w))  # [B, D, h, w]
    if with_cls:
        maps += [t[:, 0, :, None, None].float().expand(-1, -1, h, w) for t in blocks]
    return torch.cat(maps, dim=1)


class TokenMaps:
    """Token maps of one split: cached once (fp16, in memory) or computed per batch (online)."""

    def __init__(
        self, encoder: Encoder, split: DenseSplit, n_blocks: int, with_cls: bool,
        device: torch.device, cache: bool, batch_size: int,
    ) -> None:  # fmt: skip
        self.encoder, self.split, self.n_blocks, self.with_cls = encoder, split, n_blocks, with_cls
        self.device, self.size = device, int(encoder.cfg.img_size)
        self.cached: torch.Tensor | None = None
        if cache:
            chunks = [self._compute(list(range(i, min(i + batch_size, len(split)))))
                      for i in range(0, len(split), batch_size)]  # fmt: skip
            self.cached = torch.cat([c.to("cpu", torch.float16) for c in chunks])

    def _compute(self, idx: Sequence[int]) -> torch.Tensor:
        x = torch.stack([self.split.image(i, self.size) for i in idx]).to(self.device)
        return token_maps(self.encoder, x, self.n_blocks, self.with_cls)

    def get(self, idx: Sequence[int]) -> torch.Tensor:
        """``[B, C, h, w]`` float32 on the device for samples ``idx``."""
        if self.cached is not None:
            return self.cached[torch.as_tensor(list(idx))].to(self.device, torch.float32)
        return self._compute(idx)

    @property
    def nbytes(self) -> int:
        return 0 if self.cached is None else self.cached.numel() * 2


def use_cache(mode: str, images: int, channels: int, grid: tuple[int, int], max_gb: float) -> bool:
    """``cache`` / ``online`` as asked; ``auto`` caches when fp16 maps fit ``max_gb``."""
    if mode != "auto":
        return mode == "cache"
    return images * channels * grid[0] * grid[1] * 2 <= max_gb * 2**30


# --------------------------------------------------------------------------- metrics


def seg_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[3, K]`` pixel counts of one image: intersection, prediction area, label area, over the
    pixels whose label is not 255 (mmseg's ``intersect_and_union``)."""
    keep = label != IGNORE_INDEX
    p, t = pred[keep].long(), label[keep].long()
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = torch.bincount(p, minlength=num_classes)[:num_classes]
    area_t = torch.bincount(t, minlength=num_classes)[:num_classes]
    return torch.stack([inter, area_p, area_t]).cpu()


def miou_aacc(counts: torch.Tensor) -> tuple[float, float, list[float | None]]:
    """``(mIoU, aAcc, per-class IoU)`` (0-100) from summed :func:`seg_counts`; classes whose
    union is empty are left out of the mean (None in the list)."""
    inter, area_p, area_t = (c.double() for c in counts)
    union = area_p + area_t - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    valid = ~torch.isnan(iou)
    miou = float(iou[valid].mean() * 100) if valid.any() else 0.0
    aacc = float(inter.sum() / area_t.sum().clamp(min=1) * 100)
    return miou, aacc, [None if torch.isnan(v) else float(v * 100) for v in iou]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``[B, C, h, w]`` to ``size`` (align_corners False, as mmseg)."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- linear heads


class BNConvHead(nn.Module):
    """BatchNorm + 1 x 1 convolution over token maps (DINOv2's ``BNHead`` + ``cls_seg``)."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, out, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)  # mmseg's decode-head init
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


@dataclass
class LrHead:
    """One head of the lr grid with its optimizer."""

    lr: float
    model: nn.Module
    opt: torch.optim.Optimizer


def make_heads(make: Callable[[], nn.Module], lrs: Sequence[float], weight_decay: float, seed: int,
               tag: str, device: torch.device) -> list[LrHead]:  # fmt: skip
    """One head per lr, all starting from the same weights (seeded by ``seed`` and ``tag``)."""
    heads = []
    for lr in lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + zlib.crc32(tag.encode()))
            model = make().to(device).train()
        heads.append(LrHead(lr, model, torch.optim.AdamW(model.parameters(), lr=lr,
                                                         weight_decay=weight_decay)))  # fmt: skip
    return heads


def train_heads(
    heads: list[LrHead], maps: TokenMaps, targets: torch.Tensor, fit: torch.Tensor, epochs: int,
    batch_size: int, seed: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[float]:  # fmt: skip
    """Train every head on the same batches of ``fit`` (AdamW, half-cosine lr decay from each
    head's lr); ``targets`` ``[N, S, S]`` are the train targets at the training label size.
    Returns the summed loss per step."""
    bs = min(batch_size, len(fit))
    steps_per_epoch = max(1, len(fit) // bs)
    total, step, losses = epochs * steps_per_epoch, 0, []
    dev = next(heads[0].model.parameters()).device
    for epoch in range(epochs):
        order = fit[torch.randperm(len(fit), generator=torch.Generator().manual_seed(
            seed * 7_919 + epoch))]  # fmt: skip
        for i in range(0, steps_per_epoch * bs, bs):
            idx = order[i : i + bs].tolist()
            x, y = maps.get(idx), targets[idx].to(dev)
            loss = sum((loss_fn(upsample(h.model(x), tuple(y.shape[-2:])), y) for h in heads),
                       x.new_zeros(()))  # fmt: skip
            if not torch.isfinite(loss):
                raise FloatingPointError(f"dense probe loss is {loss.item()}: lower the lrs")
            for h in heads:
                for g in h.opt.param_groups:
                    g["lr"] = lr_at(step, total, 0, h.lr, 0.0)
                h.opt.zero_grad(set_to_none=True)
            loss.backward()
            for h in heads:
                h.opt.step()
            losses.append(loss.item())
            step += 1
    return losses


@torch.no_grad()
def predict_maps(
    heads: Sequence[nn.Module], maps: TokenMaps, idx: Sequence[int], batch_size: int,
    each: Callable[[int, int, torch.Tensor], None],
) -> None:  # fmt: skip
    """Call ``each(head index, sample index, output [C, h, w])`` for every head and sample."""
    for m in heads:
        m.eval()
    idx = list(idx)
    for i in range(0, len(idx), batch_size):
        chunk = idx[i : i + batch_size]
        x = maps.get(chunk)
        for k, m in enumerate(heads):
            out = m(x)
            for j, s in enumerate(chunk):
                each(k, s, out[j])


def seg_scores(
    heads: Sequence[nn.Module], maps: TokenMaps, split: DenseSplit, idx: Sequence[int],
    num_classes: int, batch_size: int,
) -> list[tuple[float, float]]:  # fmt: skip
    """``(mIoU, aAcc)`` of every head on samples ``idx``, logits upsampled to each label's size."""
    counts = [torch.zeros(3, num_classes, dtype=torch.long) for _ in heads]

    def each(k: int, s: int, logits: torch.Tensor) -> None:
        label = split.target(s)
        pred = upsample(logits[None], tuple(label.shape))[0].argmax(0).cpu()
        counts[k] += seg_counts(pred, label, num_classes)

    predict_maps(heads, maps, idx, batch_size, each)
    return [miou_aacc(c)[:2] for c in counts]


# --------------------------------------------------------------------------- linear_seg


class LinearSegConfig(TaskConfig):
    """Linear segmentation probe (see :mod:`downstream.dense_probe`).

    Attributes:
        classes: Class names (None: ``classes.json`` beside the data, else ADE20K's 150).
        blocks: Last blocks whose patch tokens are concatenated: 1 (DINOv2 "linear") or 4
            (the "+ms" input).
        lrs: AdamW learning rates of the grid (one head each, chosen on the held-out part).
        weight_decay: AdamW weight decay.
        epochs: Passes over the train part.
        batch_size: Images per step.
        holdout_fraction: Part of train held out to choose the lr.
        label_size: Side of the train label maps (nearest resize; None: the encoder's
            img_size); val is scored at each label map's own size.
        feature_source: ``cache`` (fp16 token maps in memory), ``online`` (the frozen encoder
            every step), ``auto`` (cache when the maps fit ``cache_max_gb``).
        cache_max_gb: Largest in-memory cache ``auto`` builds.
        batch_size_extract: Batch of the frozen forward passes and of the evaluation.
    """

    name: Literal["linear_seg"] = "linear_seg"
    classes: list[str] | None = None
    blocks: Literal[1, 4] = 1
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2], min_length=1)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=2)  # BatchNorm needs more than one map
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_size: int | None = Field(None, ge=8)
    feature_source: Literal["auto", "cache", "online"] = "auto"
    cache_max_gb: float = Field(8.0, ge=0)
    batch_size_extract: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _positive_lrs(self) -> LinearSegConfig:
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be > 0, got {self.lrs}")
        return self


def _check_blocks(encoder: Encoder, blocks: int) -> None:
    if blocks > encoder.num_feature_blocks:
        raise ValueError(f"blocks: {blocks} needs {blocks} readable blocks; "
                         f"{type(encoder).__name__} has {encoder.num_feature_blocks}: set blocks: 1")  # fmt: skip


@register_task("linear_seg")
class LinearSeg(Task):
    """Linear segmentation probe (see the module docstring)."""

    name = "linear_seg"
    version = 1
    metrics = {"miou": True, "aacc": True}
    config_cls = LinearSegConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """ADE20K's layout (:func:`downstream.segmentation.check_ade`)."""
        assert isinstance(cfg, LinearSegConfig)
        check_ade(resolve_ade_root(data), cfg.classes)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the heads then train on cached token maps)."""
        return frozen_forward_step(encoder, batch)

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearSegConfig)
        t0 = time.time()
        _check_blocks(encoder, cfg.blocks)
        root = resolve_ade_root(ctx.data)
        classes = check_ade(root, cfg.classes)
        train, val = ade_split(root, "train"), ade_split(root, "val")
        encoder.to(ctx.device).eval()
        channels = cfg.blocks * int(encoder.num_features)
        cache = use_cache(cfg.feature_source, len(train) + len(val), channels,
                          encoder.feature_grid, cfg.cache_max_gb)  # fmt: skip
        m_tr = TokenMaps(encoder, train, cfg.blocks, False, ctx.device, cache, cfg.batch_size_extract)
        m_va = TokenMaps(encoder, val, cfg.blocks, False, ctx.device, cache, cfg.batch_size_extract)
        t_feat = time.time() - t0
        size = cfg.label_size or int(encoder.cfg.img_size)
        y_tr = resize_targets(train, size).long()
        fit, hold = holdout_split(len(train), cfg.holdout_fraction, ctx.seed)
        k = len(classes)
        heads = make_heads(lambda: BNConvHead(channels, k), cfg.lrs, cfg.weight_decay, ctx.seed,
                           "linear_seg", ctx.device)  # fmt: skip
        t1 = time.time()
        losses = train_heads(heads, m_tr, y_tr, fit, cfg.epochs, cfg.batch_size, ctx.seed,
                             lambda o, y: F.cross_entropy(o, y, ignore_index=IGNORE_INDEX))  # fmt: skip
        t_train = time.time() - t1
        models = [h.model for h in heads]
        on_hold = seg_scores(models, m_tr, train, hold.tolist(), k, cfg.batch_size_extract)
        on_val = seg_scores(models, m_va, val, range(len(val)), k, cfg.batch_size_extract)
        table = [{"lr": h.lr, "holdout_miou": ho[0], "val_miou": va[0], "val_aacc": va[1]}
                 for h, ho, va in zip(heads, on_hold, on_val, strict=True)]  # fmt: skip
        best = max(table, key=lambda r: r["holdout_miou"])  # first of ties: the lowest lr
        ctx.log(f"[linear_seg] blocks {cfg.blocks}: lr {best['lr']:g} (holdout mIoU "
                f"{best['holdout_miou']:.1f}) -> val mIoU {best['val_miou']:.2f} aAcc "
                f"{best['val_aacc']:.2f} ({time.time() - t0:.1f}s)")  # fmt: skip
        return TaskResult(
            metrics={"miou": best["val_miou"], "aacc": best["val_aacc"]},
            details={"best_lr": best["lr"], "holdout_miou": best["holdout_miou"], "heads": table,
                     "blocks": cfg.blocks, "classes": classes, "num_train": len(fit),
                     "num_holdout": len(hold), "num_val": len(val), "label_size": size,
                     "feature_source": "cache" if cache else "online",
                     "feature_cache_bytes": m_tr.nbytes + m_va.nbytes,
                     "loss_first": losses[0] if losses else None,
                     "loss_last": losses[-1] if losses else None, "feature_seconds": t_feat,
                     "head_seconds": t_train, "total_seconds": time.time() - t0},
        )  # fmt: skip


# --------------------------------------------------------------------------- knn_seg


class KNNSegConfig(TaskConfig):
    """Dense kNN segmentation (see :mod:`downstream.dense_probe`).

    Attributes:
        classes: Class names (None: ``classes.json`` beside the data, else ADE20K's 150).
        k: Bank patches each val patch takes the labels of.
        temperature: Neighbour weights ``softmax(cosine / temperature)`` over the k.
        patch_labels: ``soft`` (the class distribution of the patch's pixels, Hummingbird's) or
            ``majority`` (one-hot of its most frequent class).
        max_bank: Most bank patches: each train image keeps at most ``ceil(max_bank / N)``
            of its labelled patches (a seeded random subset), so memory stays bounded on
            ADE20K's 20k images (Hummingbird, too, fills a memory of fixed size).
        chunk_size: Val patches compared with the bank at once.
        batch_size_extract: Batch of the frozen forward passes.
    """

    name: Literal["knn_seg"] = "knn_seg"
    classes: list[str] | None = None
    k: int = Field(30, ge=1)
    temperature: float = Field(0.02, gt=0)
    patch_labels: Literal["soft", "majority"] = "soft"
    max_bank: int = Field(1_000_000, ge=1)
    chunk_size: int = Field(4096, ge=1)
    batch_size_extract: int = Field(32, ge=1)


def patch_label_dists(labels: torch.Tensor, grid: tuple[int, int], num_classes: int,
                      majority: bool) -> torch.Tensor:  # fmt: skip
    """Per-patch class distributions ``[N, h * w, K]`` of label maps ``[N, h * p, w * p]``
    (pixels labelled 255 not counted; a patch without a labelled pixel is all zeros).
    ``majority``: the one-hot of the most frequent class (the lowest id of ties)."""
    n, hh, ww = labels.shape
    h, w = grid
    ph, pw = hh // h, ww // w
    lab = labels.view(n, h, ph, w, pw).permute(0, 1, 3, 2, 4).reshape(n, h * w, ph * pw)
    valid = lab != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, lab, 0), num_classes).float() * valid[..., None]
    counts = onehot.sum(dim=2)  # [N, h*w, K]
    if majority:
        top = counts.argmax(dim=-1)
        return F.one_hot(top, num_classes).float() * (counts.sum(-1, keepdim=True) > 0)
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def knn_patch_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, k: int,
                      temperature: float, chunk_size: int = 4096) -> torch.Tensor:  # fmt: skip
    """Class distributions ``[Q, K]`` of query patches: the softmax(cosine / T)-weighted mean of
    the label distributions of their ``k`` most similar bank patches.

    Args:
        bank: ``[M, D]`` L2-normalized bank features.
        bank_labels: ``[M, K]`` their label distributions.
        query: ``[Q, D]`` L2-normalized.
    """
    k = min(k, bank.shape[0])
    out = []
    for i in range(0, query.shape[0], chunk_size):
        sim, idx = (query[i : i + chunk_size] @ bank.T).topk(k, dim=1)  # [q, k]
        wts = torch.softmax(sim / temperature, dim=1)
        out.append((wts[..., None] * bank_labels[idx]).sum(dim=1))  # [q, K]
    return torch.cat(out) if out else bank_labels.new_zeros(0, bank_labels.shape[1])


@register_task("knn_seg")
class KNNSeg(Task):
    """Dense kNN segmentation (see the module docstring)."""

    name = "knn_seg"
    version = 1
    metrics = {"miou": True, "aacc": True}
    config_cls = KNNSegConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """ADE20K's layout (:func:`downstream.segmentation.check_ade`)."""
        assert isinstance(cfg, KNNSegConfig)
        check_ade(resolve_ade_root(data), cfg.classes)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the retrieval works on the extracted bank)."""
        return frozen_forward_step(encoder, batch)

    def bench_images(self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int,
                     n_val: int) -> int | None:  # fmt: skip
        """Not estimated: its images are ADE20K's, not the classification splits counted."""
        return None

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, KNNSegConfig)
        t0 = time.time()
        root = resolve_ade_root(ctx.data)
        classes = check_ade(root, cfg.classes)
        train, val = ade_split(root, "train"), ade_split(root, "val")
        encoder.to(ctx.device).eval()
        grid = encoder.feature_grid
        size = int(encoder.cfg.img_size)
        bank, bank_lab = self._bank(encoder, train, grid, size, len(classes), cfg, ctx)
        t_bank = time.time() - t0
        m_va = TokenMaps(encoder, val, 1, False, ctx.device, False, cfg.batch_size_extract)
        counts = torch.zeros(3, len(classes), dtype=torch.long)
        for i in range(0, len(val), cfg.batch_size_extract):
            chunk = list(range(i, min(i + cfg.batch_size_extract, len(val))))
            feats = m_va.get(chunk)  # [B, D, h, w]
            for s, f in zip(chunk, feats, strict=True):
                q = F.normalize(f.flatten(1).T, dim=1)  # [h*w, D]
                dist = knn_patch_predict(bank, bank_lab, q, cfg.k, cfg.temperature, cfg.chunk_size)
                label = val.target(s)
                maps = dist.T.reshape(1, len(classes), *grid)  # [1, K, h, w]
                pred = upsample(maps, tuple(label.shape))[0].argmax(0).cpu()
                counts += seg_counts(pred, label, len(classes))
        miou, aacc, per_class = miou_aacc(counts)
        ctx.log(f"[knn_seg] k={cfg.k} T={cfg.temperature} {cfg.patch_labels} labels, bank "
                f"{bank.shape[0]} patches: mIoU {miou:.2f} aAcc {aacc:.2f} "
                f"({time.time() - t0:.1f}s)")  # fmt: skip
        return TaskResult(
            metrics={"miou": miou, "aacc": aacc},
            details={"k": cfg.k, "temperature": cfg.temperature, "patch_labels": cfg.patch_labels,
                     "bank_patches": int(bank.shape[0]), "classes": classes,
                     "per_class_iou": per_class, "num_train": len(train), "num_val": len(val),
                     "bank_seconds": t_bank, "total_seconds": time.time() - t0},
        )  # fmt: skip

    @staticmethod
    def _bank(encoder: Encoder, train: DenseSplit, grid: tuple[int, int], size: int,
              num_classes: int, cfg: KNNSegConfig, ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The normalized bank features ``[M, D]`` and label distributions ``[M, K]`` on the
        device: the labelled patches of every train image, at most ``ceil(max_bank / N)`` of
        each (a seeded random subset), extracted batch by batch."""
        quota = -(-cfg.max_bank // len(train))
        g = torch.Generator().manual_seed(ctx.seed * 7_919 + 3)
        maps = TokenMaps(encoder, train, 1, False, ctx.device, False, cfg.batch_size_extract)
        feats, dists = [], []
        for i in range(0, len(train), cfg.batch_size_extract):
            chunk = list(range(i, min(i + cfg.batch_size_extract, len(train))))
            f = F.normalize(maps.get(chunk).flatten(2).transpose(1, 2), dim=2)  # [B, h*w, D]
            labels = torch.stack([resize_targets(DenseSplit([train.pairs[j]], train.read_target),
                                                 size)[0] for j in chunk]).long()  # fmt: skip
            d = patch_label_dists(labels, grid, num_classes, cfg.patch_labels == "majority")
            for fi, di in zip(f, d.to(f.device), strict=True):
                keep = (di.sum(dim=1) > 0).nonzero().flatten().cpu()
                if len(keep) > quota:
                    keep = keep[torch.randperm(len(keep), generator=g)[:quota]].sort().values
                feats.append(fi[keep.to(fi.device)])
                dists.append(di[keep.to(di.device)])
        return torch.cat(feats), torch.cat(dists)
