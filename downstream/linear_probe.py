"""Linear probing on frozen features, the fast mode: features extracted once, a grid of heads
trained together on them.

Each head is MAE's linear-probe head (He et al., CVPR 2022, appendix A.2): BatchNorm without
affine parameters (eps 1e-6) before a linear classifier initialized with std 0.01. Features are
the class token after the final norm (MAE) or the average of the patch tokens. Instead of one
long run per hyperparameter, every (pooling, learning rate) pair gets its own head and all heads
see the same batches of the cached features in a single pass, as DINOv2's linear evaluation does
(Oquab et al., 2023). Learning rates are base rates scaled by ``batch / 256``; SGD with momentum,
a cosine schedule, no weight decay by default.

The head is chosen on a held-out, class-stratified part of train, never on val; the record
reports val top-1 (and top-5) of that head and lists every head's numbers in ``details``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from harness.config import TaskConfig
from harness.data.datasets import eval_transform, imagefolder, resolve_imagefolder_root
from pretrain.encoder import ViTEncoder

from .base import TASKS, Task, TaskContext, TaskResult


class LinearProbeConfig(TaskConfig):
    """Fast linear probe on cached frozen features (see :mod:`downstream.linear_probe`).

    A grid of heads (``lrs`` x ``pooling``), each MAE's probe head (BatchNorm without affine,
    then a linear layer), is trained together on features extracted once; the head is chosen on
    a held-out part of train, never on val.
    """

    name: Literal["linear_probe"] = "linear_probe"
    pooling: list[Literal["cls", "avg"]] = Field(default_factory=lambda: ["cls", "avg"], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], min_length=1)
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)
    momentum: float = 0.9
    weight_decay: float = Field(0.0, ge=0)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    batch_size_extract: int = Field(128, ge=1)


@torch.no_grad()
def extract_features(
    encoder: ViTEncoder, loader: DataLoader, poolings: list[str], device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Frozen features for every image: ``{pooling: [N, D]}`` and labels ``[N]``."""
    encoder.eval()
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
    labels: list[torch.Tensor] = []
    for imgs, y in loader:
        tokens = encoder.forward_features(imgs.to(device))  # [B, 1 + L, D]
        for p in poolings:
            feats[p].append(encoder.pool(tokens, p).float().cpu())
        labels.append(y)
    return {p: torch.cat(v) for p, v in feats.items()}, torch.cat(labels)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    """MAE's probe head: BatchNorm1d(affine=False, eps=1e-6) then Linear (std 0.01 init)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest logits."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == y.unsqueeze(1)).any(dim=1)
    return 100.0 * hit.float().mean().item()


def train_heads(
    feats: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    cfg: LinearProbeConfig,
    seed: int,
) -> dict[tuple[str, float], ProbeHead]:
    """Train one head per (pooling, lr) on the same batches of cached features."""
    torch.manual_seed(seed)
    n = labels.shape[0]
    heads: dict[tuple[str, float], ProbeHead] = {}
    groups = []
    bs = min(cfg.batch_size, n)
    for p in cfg.pooling:
        for lr in cfg.lrs:
            h = ProbeHead(feats[p].shape[1], num_classes)
            heads[(p, lr)] = h
            groups.append({"params": list(h.parameters()), "base": lr * bs / 256, "lr": lr * bs / 256})
    opt = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n // bs)
    total = cfg.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(seed + 1)
    step = 0
    for h in heads.values():
        h.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * bs : (i + 1) * bs]
            y = labels[idx]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            for grp in opt.param_groups:
                grp["lr"] = grp["base"] * scale
            loss = sum(F.cross_entropy(h(feats[p][idx]), y) for (p, _), h in heads.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            step += 1
    for h in heads.values():
        h.eval()
    return heads


@TASKS.register("linear_probe")
class LinearProbe(Task):
    """Fast linear probe (see the module docstring)."""

    name = "linear_probe"
    version = 1
    metrics = {"top1": True, "top5": True}
    config_cls = LinearProbeConfig

    def run(self, encoder: ViTEncoder, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearProbeConfig)
        t0 = time.time()
        root = resolve_imagefolder_root(ctx.data)
        tf = eval_transform(int(encoder.cfg.img_size), ctx.data.eval_crop_pct)  # type: ignore[arg-type]
        train = imagefolder(root, "train", tf)
        val = imagefolder(root, "val", tf)
        num_classes = len(train.classes)
        encoder = encoder.to(ctx.device)

        def loader(ds: Any) -> DataLoader:
            return DataLoader(ds, batch_size=cfg.batch_size_extract, shuffle=False,
                              num_workers=ctx.data.num_workers)

        ftr, ytr = extract_features(encoder, loader(train), list(cfg.pooling), ctx.device)
        fva, yva = extract_features(encoder, loader(val), list(cfg.pooling), ctx.device)
        t_feat = time.time() - t0
        fit, hold = stratified_holdout(ytr, cfg.holdout_fraction, ctx.seed)
        heads = train_heads({p: f[fit] for p, f in ftr.items()}, ytr[fit], num_classes, cfg, ctx.seed)

        table = []
        with torch.no_grad():
            for (p, lr), h in heads.items():
                table.append({
                    "pooling": p, "lr": lr,
                    "holdout_top1": topk_accuracy(h(ftr[p][hold]), ytr[hold], 1),
                    "val_top1": topk_accuracy(h(fva[p]), yva, 1),
                    "val_top5": topk_accuracy(h(fva[p]), yva, 5),
                })
        best = max(table, key=lambda r: r["holdout_top1"])  # first of ties: grid order
        ctx.log(
            f"[linear_probe] best head pooling={best['pooling']} lr={best['lr']} "
            f"holdout {best['holdout_top1']:.1f} -> val top1 {best['val_top1']:.2f}"
        )
        return TaskResult(
            metrics={"top1": best["val_top1"], "top5": best["val_top5"]},
            details={
                "best_head": {"pooling": best["pooling"], "lr": best["lr"]},
                "holdout_top1": best["holdout_top1"],
                "heads": table,
                "num_classes": num_classes,
                "num_train": len(fit), "num_holdout": len(hold), "num_val": int(yva.numel()),
                "feature_seconds": t_feat, "total_seconds": time.time() - t0,
            },
        )
