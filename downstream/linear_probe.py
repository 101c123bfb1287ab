"""Linear probing of frozen encoders in two modes that share one head definition.

The head is MAE's linear-probe head (He et al., CVPR 2022, appendix A.2): BatchNorm without
affine parameters (eps 1e-6) before a linear classifier initialized with std 0.01.

* ``linear_probe`` (fast): features are extracted once (optionally with K augmented views per
  image) and cached on disk by :mod:`downstream.features`; then a grid of heads, learning rates x
  pooling x last-k blocks as in DINOv2's linear evaluation (Oquab et al., 2023), is trained
  together in one pass over the cached features: every head sees the same batches, heads on the
  same input share the (affine-free) BatchNorm. SGD with momentum, a cosine schedule, no weight
  decay; learning rates are base rates scaled by ``batch / 256``. The head is chosen on a
  held-out, class-stratified part of train, never on val; the record says which head won and
  lists every head's numbers.
* ``linear_probe_faithful``: MAE's protocol end to end. Every epoch the training images go
  through RandomResizedCrop + flip and the frozen encoder; one head (class token, or average
  pooling) is trained with LARS (You et al., 2017; momentum 0.9, trust coefficient 0.001, no
  weight decay, no adaptation of biases), base lr 0.1 with ``lr = base_lr * batch / 256``, batch
  16384, 90 epochs with 10 warmup epochs then a half-cosine, BatchNorm statistics per
  ``micro_batch_size`` (MAE: 512 per GPU, gradients accumulated to the full batch). The val
  accuracy after the last epoch is reported (no selection on val). Resumes per epoch.

``mimbench bench-probe`` (:mod:`downstream.bench_probe`) runs both on the same encoder and data.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from harness.core.config import TaskConfig
from harness.core.tracking import progress

from .base import Task, TaskContext, TaskResult, register_task


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
        lrs: Base learning rates (scaled by ``batch_size / 256``).
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
    """

    name: Literal["linear_probe"] = "linear_probe"
    pooling: list[Literal["cls", "avg", "cls_avg"]] = Field(
        default_factory=lambda: ["cls", "avg", "cls_avg"], min_length=1
    )
    last_blocks: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)
    lrs: list[float] = Field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0], min_length=1)
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

    @model_validator(mode="after")
    def _positive_blocks(self) -> LinearProbeConfig:
        if any(k < 1 for k in self.last_blocks):
            raise ValueError(f"last_blocks must be >= 1, got {self.last_blocks}")
        return self


class LinearProbeFaithfulConfig(TaskConfig):
    """MAE's linear probe protocol (He et al., CVPR 2022, appendix A.2, Table 9).

    Attributes:
        pooling: ``cls`` (MAE's default) or ``avg`` (MAE's ``global_pool``: the mean of the
            patch tokens before the final norm, then an affine-free LayerNorm).
        base_lr: LARS base learning rate; ``lr = base_lr * batch_size / 256`` (MAE: 0.1).
        batch_size: Effective batch (MAE: 16384).
        micro_batch_size: Images per forward; BatchNorm statistics are per micro-batch and
            gradients are accumulated to ``batch_size`` (MAE: 512 per GPU on 32 GPUs).
        epochs: Training epochs (MAE: 90).
        warmup_epochs: Linear warmup epochs (MAE: 10).
        min_lr: Floor of the half-cosine schedule.
        weight_decay: MAE: 0.
        momentum: LARS momentum (0.9).
        trust_coefficient: LARS trust coefficient (0.001).
        crop_scale: RandomResizedCrop scale range (torchvision default, as MAE).
        hflip: Random horizontal flips.
        num_workers: Loader workers (``None``: the data config's).
        strict_data: Unreadable image files are fatal instead of skipped and counted.
    """

    name: Literal["linear_probe_faithful"] = "linear_probe_faithful"
    pooling: Literal["cls", "avg"] = "cls"
    base_lr: float = Field(0.1, gt=0)
    batch_size: int = Field(16384, ge=1)
    micro_batch_size: int = Field(512, ge=1)
    epochs: int = Field(90, ge=1)
    warmup_epochs: float = Field(10, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    num_workers: int | None = Field(None, ge=0)
    strict_data: bool = False

    @model_validator(mode="after")
    def _micro_divides(self) -> LinearProbeFaithfulConfig:
        if self.micro_batch_size > self.batch_size:
            object.__setattr__(self, "micro_batch_size", self.batch_size)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}"
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


def _num_workers(ctx: TaskContext, override: int | None = None) -> int:
    return ctx.data.num_workers if override is None else override


# --------------------------------------------------------------------------- fast mode


@register_task("linear_probe")
class LinearProbe(Task):
    """Fast linear probe (see the module docstring).

    Version 2: cached features (optionally several views), ``last_blocks`` and ``cls_avg`` in
    the grid, unreadable images skipped and counted.
    """

    name = "linear_probe"
    version = 2
    metrics = {"top1": True, "top5": True}
    config_cls = LinearProbeConfig

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearProbeConfig)
        from downstream.features import encoder_fingerprint, get_features
        from harness.core.data.datasets import (
            eval_transform,
            imagefolder_checked,
            resolve_imagefolder_root,
        )

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
        return TaskResult(
            metrics={"top1": best["val_top1"], "top5": best["val_top5"]},
            details={
                "best_head": {
                    "pooling": best["pooling"],
                    "last_blocks": best["last_blocks"],
                    "lr": best["lr"],
                },
                "holdout_top1": best["holdout_top1"],
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


def probe_train_transform(img_size: int, crop_scale: tuple[float, float], hflip: bool) -> Any:
    """MAE's linear-probe augmentation: RandomResizedCrop (bicubic) + flip + normalize."""
    from harness.core.data.datasets import pretrain_transform

    return pretrain_transform(img_size, crop_scale, hflip)


# --------------------------------------------------------------------------- faithful mode


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as used by MAE's linear probe: SGD with momentum whose update of
    each weight matrix is scaled by ``trust_coefficient * ||w|| / ||g + wd * w||``; parameters
    with one dimension (biases, norms) get neither weight decay nor the scaling."""

    def __init__(
        self,
        params: Any,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                trust_coefficient=trust_coefficient,
            ),
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(w_norm)
                    q = torch.where(
                        w_norm > 0,
                        torch.where(d_norm > 0, g["trust_coefficient"] * w_norm / d_norm, one),
                        one,
                    )
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return None


@register_task("linear_probe_faithful")
class LinearProbeFaithful(Task):
    """MAE's linear probe, end to end (see the module docstring).

    Version 2: ``pooling: avg`` is MAE's ``global_pool`` (:meth:`Encoder.global_pool`), no longer
    the mean of the normed patch tokens.
    """

    name = "linear_probe_faithful"
    version = 2
    metrics = {"top1": True, "top5": True}
    config_cls = LinearProbeFaithfulConfig

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearProbeFaithfulConfig)
        from torch.utils.data import DataLoader

        from harness.core.config import ConfigError
        from harness.core.data.datasets import (
            SeededDataset,
            SkipTally,
            collate_skipping,
            eval_transform,
            imagefolder_checked,
            resolve_imagefolder_root,
        )
        from harness.core.fsutil import atomic_torch_save, config_hash
        from pretrain.engine import autocast_dtype, lr_at

        t0 = time.time()
        device = ctx.device
        amp = autocast_dtype("auto", device)
        root = resolve_imagefolder_root(ctx.data)
        img = int(encoder.cfg.img_size)
        strict = cfg.strict_data or ctx.data.strict_data
        train = imagefolder_checked(
            root, "train", probe_train_transform(img, cfg.crop_scale, cfg.hflip), strict
        )
        val = imagefolder_checked(
            root, "val", eval_transform(img, ctx.data.eval_crop_pct), strict
        )
        train_skips, val_skips = SkipTally(train, "train"), SkipTally(val, "val")
        num_classes = len(train.classes)
        n = len(train)
        steps_per_epoch = n // cfg.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(
                f"train split has {n} images, fewer than one batch of {cfg.batch_size}: lower "
                "batch_size (the lr scales with it)"
            )
        accum = cfg.batch_size // cfg.micro_batch_size
        total = cfg.epochs * steps_per_epoch
        warmup = cfg.warmup_epochs * steps_per_epoch
        peak = cfg.base_lr * cfg.batch_size / 256
        encoder = encoder.to(device).eval()
        torch.manual_seed(ctx.seed)
        head = ProbeHead(int(encoder.num_features), num_classes).to(device)
        opt = LARS(
            head.parameters(),
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            trust_coefficient=cfg.trust_coefficient,
        )
        workers = _num_workers(ctx, cfg.num_workers)
        seeded = SeededDataset(train, ctx.seed)

        from downstream.features import encoder_fingerprint

        chash = config_hash(
            {
                "cfg": cfg.model_dump(mode="json"),
                "encoder": encoder_fingerprint(encoder),
                "data": ctx.data.model_dump(mode="json"),
                "seed": ctx.seed,
            }
        )
        ckpt = ctx.out_dir / "linear_probe_faithful.pth"
        epoch0, history, skipped = 0, [], 0
        if ckpt.is_file():
            ck = torch.load(ckpt, map_location="cpu", weights_only=True)
            if ck.get("config_hash") == chash:
                head.load_state_dict(ck["head"])
                opt.load_state_dict(ck["optimizer"])
                epoch0, history, skipped = int(ck["epoch"]), list(ck["history"]), int(ck["skipped"])
                ctx.log(f"[linear_probe_faithful] resumed after epoch {epoch0} from {ckpt}")
            else:
                ctx.log(
                    f"[linear_probe_faithful] {ckpt} is from another config or encoder: starting over"
                )

        def forward_feats(x: torch.Tensor) -> torch.Tensor:
            with (
                torch.no_grad(),
                torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None),
            ):
                x = x.to(device, non_blocking=True)
                if cfg.pooling == "avg":
                    return encoder.global_pool(x).float()
                return encoder.pool(encoder.forward_features(x), "cls").float()

        ctx.log(
            f"[linear_probe_faithful] {n} images, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
            f"batch {cfg.batch_size} ({accum} x {cfg.micro_batch_size}), lr {peak:.3g}, LARS"
        )
        step = epoch0 * steps_per_epoch
        for epoch in range(epoch0, cfg.epochs):
            seeded.set_epoch(epoch)
            g = torch.Generator().manual_seed((ctx.seed * 7_919 + epoch) % (2**63 - 1))
            order = torch.randperm(n, generator=g)[: steps_per_epoch * cfg.batch_size]
            micro = order.view(-1, cfg.micro_batch_size).tolist()
            loader = DataLoader(
                seeded,
                batch_sampler=micro,
                num_workers=workers,
                collate_fn=collate_skipping,
                pin_memory=device.type == "cuda",
            )
            head.train()
            losses = []
            bar = progress(loader, desc=f"probe epoch {epoch + 1}/{cfg.epochs}", unit="batch")
            for i, (x, y, keep) in enumerate(bar):
                if i % accum == 0:
                    lr = lr_at(step, total, warmup, peak, cfg.min_lr)
                    for grp in opt.param_groups:
                        grp["lr"] = lr
                skipped += int((~keep).sum())
                train_skips.add(micro[i], keep)
                train_skips.report(ctx.log)  # each unreadable file named once
                train_skips.check_readable()
                if x.shape[0] > 1:  # BatchNorm needs two samples
                    loss = F.cross_entropy(head(forward_feats(x)), y.to(device))
                    (loss / accum).backward()
                    losses.append(float(loss.item()))
                if (i + 1) % accum == 0:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": sum(losses) / max(1, len(losses)),
                    "lr": opt.param_groups[0]["lr"],
                }
            )
            atomic_torch_save(
                {
                    "head": head.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "skipped": skipped,
                    "config_hash": chash,
                },
                ckpt,
            )
            ctx.log(
                f"[linear_probe_faithful] epoch {epoch + 1}/{cfg.epochs} loss {history[-1]['loss']:.4f}"
            )
        t_train = time.time() - t0
        head.eval()
        logits, labels = [], []
        vloader = DataLoader(
            val,
            batch_size=cfg.micro_batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_skipping,
        )
        with torch.no_grad():
            for x, y, keep in vloader:
                val_skips.add(range(val_skips.seen, val_skips.seen + len(keep)), keep)
                if x.numel():
                    logits.append(head(forward_feats(x)).cpu())
                    labels.append(y)
        val_skips.report(ctx.log)
        val_skips.check_readable()
        val_skipped = val_skips.num_skipped
        lv, yv = torch.cat(logits), torch.cat(labels)
        top1, top5 = topk_accuracy(lv, yv, 1), topk_accuracy(lv, yv, 5)
        ctx.log(f"[linear_probe_faithful] val top1 {top1:.2f} top5 {top5:.2f}")
        return TaskResult(
            metrics={"top1": top1, "top5": top5},
            details={
                "pooling": cfg.pooling,
                "lr": peak,
                "steps": step,
                "epochs": cfg.epochs,
                "num_classes": num_classes,
                "num_train": n,
                "num_val": int(yv.numel()),
                "skipped_images": {"train_batches_total": skipped, "val": val_skipped},
                "history": history[-5:],
                "train_seconds": t_train,
                "total_seconds": time.time() - t0,
            },
        )
