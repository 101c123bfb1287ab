"""Weighted k-nearest-neighbour classification on frozen features (DINO's protocol).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Sec. 4.1
and ``eval_knn.py``: features (the class token after the final norm) of the train and val images,
both with the evaluation transform, are L2-normalized; each val image votes among its k most
cosine-similar train images, neighbour j with weight ``exp(sim_j / T)`` for its class;
k = 20 and T = 0.07. Top-1 and top-5 of the summed votes are reported, and the accuracies for the
other k of DINO's table (10, 100, 200) go into the details.

Features come from the on-disk cache of :mod:`downstream.features`, shared with the fast linear
probe (an entry the probe wrote with more blocks or views serves kNN too, and one it wrote in
float16 when both set ``cache_dtype: float16``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from downstream.features import Features, encoder_fingerprint, get_features
from downstream.linear_probe import topk_accuracy
from harness.core.config import DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import (
    check_classification_data,
    eval_transform,
    imagefolder_checked,
    resolve_imagefolder_root,
)

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .features import frozen_forward_step


class KNNConfig(TaskConfig):
    """Weighted kNN (see :mod:`downstream.knn`).

    Attributes:
        k: Neighbours that vote (DINO: 20).
        temperature: Vote weight ``exp(similarity / temperature)`` (DINO: 0.07).
        extra_k: Further k evaluated for the details (DINO's table: 10, 20, 100, 200).
        pooling: ``cls`` (DINO) or ``avg`` (mean patch token; the only one for Swin).
        chunk_size: Val images compared with the whole train set at once.
        batch_size_extract: Batch of the feature extraction.
        cache_features: Read / write the on-disk feature cache.
        cache_dir: Feature cache directory (default ``$MIMBENCH_CACHE/features``).
        cache_dtype: Storage dtype of cached features, as the fast linear probe's: ``float16``
            reads (or writes) the entries a probe with ``cache_dtype: float16`` writes. The
            votes are computed in float32 either way.
        strict_data: Unreadable image files are fatal instead of skipped and counted.
        block: Vote with this one block's tokens (0-based; negative from the last) through the
            final norm instead of the output (iGPT's middle blocks); left out of the hash unset.
    """

    name: Literal["knn"] = "knn"
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    extra_k: list[int] = Field(default_factory=lambda: [10, 100, 200])
    pooling: Literal["cls", "avg"] = "cls"
    chunk_size: int = Field(256, ge=1)
    batch_size_extract: int = Field(128, ge=1)
    cache_features: bool = True
    cache_dir: str | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    strict_data: bool = False
    block: int | None = None

    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ("cache_dtype", "block")  # added later


@torch.no_grad()
def pooled_features(
    encoder: Any, cfg: Any, ctx: TaskContext, train: Any, val: Any, tf: Any,
    block: int | None = None,
) -> tuple[Features, Features, torch.Tensor, torch.Tensor]:
    """Frozen features of both splits (through the shared cache) pooled by ``cfg.pooling``:
    ``(train features, val features, [N, D] train, [M, D] val)`` on ``ctx.device``, float32.

    ``cfg`` is a task config with the feature-cache fields (``pooling``, ``cache_dir``,
    ``cache_features``, ``cache_dtype``, ``batch_size_extract``): kNN's and low-shot's.
    """
    common = dict(
        n_blocks=1,
        device=ctx.device,
        cache_dir=cfg.cache_dir,
        use_cache=cfg.cache_features,
        dtype=torch.float16 if cfg.cache_dtype == "float16" else torch.float32,
        batch_size=cfg.batch_size_extract,
        num_workers=ctx.data.num_workers,
        log=ctx.log,
        encoder_hash=encoder_fingerprint(encoder) if cfg.cache_features else None,
        block=block,
    )
    ftr = get_features(encoder, train, "train", tf, **common)
    fva = get_features(encoder, val, "val", tf, **common)
    xtr = ftr.select(cfg.pooling, 1, views=1)[:, 0].float().to(ctx.device)  # [N, D]
    xva = fva.select(cfg.pooling, 1, views=1)[:, 0].float().to(ctx.device)  # [M, D]
    return ftr, fva, xtr, xva


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores ``[Q, C]`` of weighted kNN votes.

    Args:
        train_feats: ``[N, D]``, L2-normalized.
        train_labels: ``[N]``.
        query: ``[Q, D]``, L2-normalized.
        num_classes: C.
        k: Neighbours (clipped to N).
        temperature: Weights are ``exp(cosine / temperature)``.
        chunk_size: Queries per similarity matrix.
    """
    k = min(k, train_feats.shape[0])
    out = []
    for i in range(0, query.shape[0], chunk_size):
        sim = query[i : i + chunk_size] @ train_feats.T  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [q, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


@register_task("knn")
class KNN(Task):
    """Weighted kNN (see the module docstring)."""

    name = "knn"
    version = 1
    metrics = {"top1": True, "top5": True}
    config_cls = KNNConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the votes work on cached features)."""
        return frozen_forward_step(encoder, batch)

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """Features of every train and val image (the votes are not counted)."""
        return n_train + n_val

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, KNNConfig)

        if cfg.pooling not in encoder.poolings:
            raise ValueError(f"{type(encoder).__name__} has no class token: set pooling: avg")
        t0 = time.time()
        root = resolve_imagefolder_root(ctx.data)
        tf = eval_transform(int(encoder.cfg.img_size), ctx.data.eval_crop_pct)
        strict = cfg.strict_data or ctx.data.strict_data
        train = imagefolder_checked(root, "train", None, strict)
        val = imagefolder_checked(root, "val", None, strict)
        num_classes = len(train.classes)
        ftr, fva, xtr, xva = pooled_features(encoder, cfg, ctx, train, val, tf, cfg.block)
        t_feat = time.time() - t0
        dev = ctx.device
        xtr, xva = F.normalize(xtr, dim=1), F.normalize(xva, dim=1)
        ytr, yva = ftr.labels.to(dev), fva.labels.to(dev)
        by_k = {}
        for k in sorted({cfg.k, *cfg.extra_k}):
            scores = knn_predict(
                xtr, ytr, xva, num_classes, k, cfg.temperature, cfg.chunk_size
            ).cpu()
            by_k[k] = {
                "top1": topk_accuracy(scores, yva.cpu(), 1),
                "top5": topk_accuracy(scores, yva.cpu(), 5),
            }
        res = by_k[cfg.k]
        ctx.log(
            f"[knn] k={cfg.k} T={cfg.temperature}: top1 {res['top1']:.2f} top5 {res['top5']:.2f}"
        )
        return TaskResult(
            metrics={"top1": res["top1"], "top5": res["top5"]},
            details={
                "k": cfg.k,
                "temperature": cfg.temperature,
                "pooling": cfg.pooling,
                "by_k": {str(k): v for k, v in by_k.items()},
                "num_classes": num_classes,
                "num_train": int(ytr.numel()),
                "num_val": int(yva.numel()),
                "skipped_images": {"train": ftr.num_skipped, "val": fva.num_skipped},
                "feature_cache": {"train": ftr.from_cache, "val": fva.from_cache},
                "feature_seconds": t_feat,
                "total_seconds": time.time() - t0,
            },
        )
