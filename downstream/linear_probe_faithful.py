"""MAE's linear probe protocol, end to end (He et al., CVPR 2022, appendix A.2, Table 9).

Every epoch the training images go through RandomResizedCrop + flip and the frozen encoder; one
head (:class:`downstream.linear_probe.ProbeHead` on the class token, or on MAE's global pool) is
trained with LARS (:class:`downstream.lars.LARS`; You et al., 2017; momentum 0.9, trust
coefficient 0.001, no weight decay, no adaptation of biases), base lr 0.1 with
``lr = base_lr * batch / 256``, batch 16384, 90 epochs with 10 warmup epochs then a
half-cosine, BatchNorm statistics per ``micro_batch_size`` (MAE: 512 per GPU, gradients
accumulated to the full batch). The val accuracy after the last epoch is reported (no selection
on val). Resumes per epoch; a checkpoint of another config or encoder is refused
(:func:`downstream.resume.task_checkpoint`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils.data import DataLoader

from harness.core.config import DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import (
    SeededDataset,
    SkipTally,
    check_classification_data,
    collate_skipping,
    eval_transform,
    imagefolder_checked,
    resolve_imagefolder_root,
)
from harness.core.tracking import progress
from harness.core.training import (
    GradAccumulation,
    ResumableCheckpoint,
    autocast,
    autocast_dtype,
    epoch_batches,
    lr_at,
    scaled_lr,
    set_lr,
    steps_per_epoch,
)

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .lars import LARS
from .linear_probe import ProbeHead, probe_train_transform, topk_accuracy
from .resume import task_checkpoint


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

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """``epochs`` x the full batches of train (the per-epoch evaluation is not counted)."""
        assert isinstance(cfg, LinearProbeFaithfulConfig)
        return cfg.epochs * (n_train // cfg.batch_size) * cfg.batch_size

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """One step of MAE's probe (He et al. 2022, A.2): frozen forward without gradients,
        BatchNorm + linear head forward and backward, LARS."""
        encoder.eval()
        head = ProbeHead(int(encoder.num_features), batch.num_classes).to(batch.images.device)
        opt = LARS(head.parameters(), lr=0.1)
        pooling = "cls" if encoder.num_prefix_tokens else "avg"

        def step() -> None:
            with torch.no_grad(), batch.autocast():
                feats = encoder.pool(encoder.forward_features(batch.images), pooling)  # [B, D]
            with batch.autocast():
                loss = F.cross_entropy(head(feats.float()), batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LinearProbeFaithfulConfig)
        t0 = time.time()
        run = _setup(encoder, cfg, ctx)
        epoch0 = _restore(run)
        ctx.log(
            f"[linear_probe_faithful] {run.n} images, {run.steps_per_epoch} steps/epoch x "
            f"{cfg.epochs} epochs, batch {cfg.batch_size} ({run.accum.k} x "
            f"{cfg.micro_batch_size}), lr {run.peak:.3g}, LARS"
        )
        run.step = epoch0 * run.steps_per_epoch
        for epoch in range(epoch0, cfg.epochs):
            _train_epoch(run, epoch)
            _save_checkpoint(run, epoch + 1)
            ctx.log(
                f"[linear_probe_faithful] epoch {epoch + 1}/{cfg.epochs} "
                f"loss {run.history[-1]['loss']:.4f}"
            )
        return _finish(run, time.time() - t0, t0)


@dataclass
class _ProbeRun:
    """One faithful probe between :func:`_setup` and :func:`_finish`."""

    cfg: LinearProbeFaithfulConfig
    ctx: TaskContext
    encoder: Any
    device: torch.device
    amp: torch.dtype | None
    seeded: SeededDataset
    val: Any
    train_skips: SkipTally
    val_skips: SkipTally
    workers: int
    num_classes: int
    n: int
    accum: GradAccumulation
    steps_per_epoch: int
    total: int
    warmup: float
    peak: float
    head: ProbeHead
    opt: LARS
    ckpt: ResumableCheckpoint
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0


def _setup(encoder: Any, cfg: LinearProbeFaithfulConfig, ctx: TaskContext) -> _ProbeRun:
    """Data, schedule, the frozen encoder (in eval mode on the device), head and LARS.

    Raises:
        ConfigError: The train split holds less than one batch.
    """
    device = ctx.device
    root = resolve_imagefolder_root(ctx.data)
    img = int(encoder.cfg.img_size)
    strict = cfg.strict_data or ctx.data.strict_data
    train = imagefolder_checked(
        root, "train", probe_train_transform(img, cfg.crop_scale, cfg.hflip), strict
    )
    val = imagefolder_checked(root, "val", eval_transform(img, ctx.data.eval_crop_pct), strict)
    n = len(train)
    spe = steps_per_epoch(n, cfg.batch_size, "lower batch_size (the lr scales with it)")
    encoder = encoder.to(device).eval()
    torch.manual_seed(ctx.seed)
    head = ProbeHead(int(encoder.num_features), len(train.classes)).to(device)
    opt = LARS(
        head.parameters(),
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        trust_coefficient=cfg.trust_coefficient,
    )
    return _ProbeRun(
        cfg=cfg,
        ctx=ctx,
        encoder=encoder,
        device=device,
        amp=autocast_dtype("auto", device),
        seeded=SeededDataset(train, ctx.seed),
        val=val,
        train_skips=SkipTally(train, "train"),
        val_skips=SkipTally(val, "val"),
        workers=ctx.data.num_workers if cfg.num_workers is None else cfg.num_workers,
        num_classes=len(train.classes),
        n=n,
        accum=GradAccumulation(cfg.batch_size // cfg.micro_batch_size),
        steps_per_epoch=spe,
        total=cfg.epochs * spe,
        warmup=cfg.warmup_epochs * spe,
        peak=scaled_lr(cfg.base_lr, cfg.batch_size),
        head=head,
        opt=opt,
        ckpt=task_checkpoint(
            ctx.out_dir / "linear_probe_faithful.pth", cfg, encoder, ctx.data, ctx.seed
        ),
    )


def _restore(run: _ProbeRun) -> int:
    """Continue from the task directory's checkpoint when there is one; the epochs done.

    Raises:
        CheckpointError: The checkpoint was written by another config or encoder.
    """
    ck = run.ckpt.load()
    if ck is None:
        return 0
    run.head.load_state_dict(ck["head"])
    run.opt.load_state_dict(ck["optimizer"])
    epoch0, run.history, run.skipped = int(ck["epoch"]), list(ck["history"]), int(ck["skipped"])
    run.ctx.log(f"[linear_probe_faithful] resumed after epoch {epoch0} from {run.ckpt.path}")
    return epoch0


def _save_checkpoint(run: _ProbeRun, epochs_done: int) -> None:
    run.ckpt.save(
        {
            "head": run.head.state_dict(),
            "optimizer": run.opt.state_dict(),
            "epoch": epochs_done,
            "history": run.history,
            "skipped": run.skipped,
        }
    )


def _features(run: _ProbeRun, x: torch.Tensor) -> torch.Tensor:
    """The frozen encoder's pooled features ``[B, D]`` (fp32) of images ``[B, 3, H, W]``."""
    with torch.no_grad(), autocast(run.device, run.amp):
        x = x.to(run.device, non_blocking=True)
        if run.cfg.pooling == "avg":
            return run.encoder.global_pool(x).float()
        return run.encoder.pool(run.encoder.forward_features(x), "cls").float()


def _train_epoch(run: _ProbeRun, epoch: int) -> None:
    """One epoch of LARS steps on the seeded order, ``accum`` micro-batches per step; appends
    the epoch's mean loss to the history."""
    cfg, ctx = run.cfg, run.ctx
    run.seeded.set_epoch(epoch)
    micro = epoch_batches(run.n, ctx.seed, epoch, cfg.batch_size, micro=cfg.micro_batch_size)
    loader = DataLoader(
        run.seeded,
        batch_sampler=micro,
        num_workers=run.workers,
        collate_fn=collate_skipping,
        pin_memory=run.device.type == "cuda",
    )
    run.head.train()
    losses = []
    bar = progress(loader, desc=f"probe epoch {epoch + 1}/{cfg.epochs}", unit="batch")
    for i, (x, y, keep) in enumerate(bar):
        if run.accum.starts(i):
            set_lr(run.opt, lr_at(run.step, run.total, run.warmup, run.peak, cfg.min_lr))
        run.skipped += int((~keep).sum())
        run.train_skips.add(micro[i], keep)
        run.train_skips.report(ctx.log)  # each unreadable file named once
        run.train_skips.check_readable()
        if x.shape[0] > 1:  # BatchNorm needs two samples
            loss = F.cross_entropy(run.head(_features(run, x)), y.to(run.device))
            run.accum.backward(loss)
            losses.append(float(loss.item()))
        if run.accum.ends(i):
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            run.step += 1
    run.history.append(
        {
            "epoch": epoch + 1,
            "loss": sum(losses) / max(1, len(losses)),
            "lr": run.opt.param_groups[0]["lr"],
        }
    )


def _finish(run: _ProbeRun, t_train: float, t0: float) -> TaskResult:
    """Val accuracy of the head after the last epoch, and the details."""
    cfg, ctx = run.cfg, run.ctx
    run.head.eval()
    logits, labels = [], []
    vloader = DataLoader(
        run.val,
        batch_size=cfg.micro_batch_size,
        shuffle=False,
        num_workers=run.workers,
        collate_fn=collate_skipping,
    )
    val_skips = run.val_skips
    with torch.no_grad():
        for x, y, keep in vloader:
            val_skips.add(range(val_skips.seen, val_skips.seen + len(keep)), keep)
            if x.numel():
                logits.append(run.head(_features(run, x)).cpu())
                labels.append(y)
    val_skips.report(ctx.log)
    val_skips.check_readable()
    lv, yv = torch.cat(logits), torch.cat(labels)
    top1, top5 = topk_accuracy(lv, yv, 1), topk_accuracy(lv, yv, 5)
    ctx.log(f"[linear_probe_faithful] val top1 {top1:.2f} top5 {top5:.2f}")
    return TaskResult(
        metrics={"top1": top1, "top5": top5},
        details={
            "pooling": cfg.pooling,
            "lr": run.peak,
            "steps": run.step,
            "epochs": cfg.epochs,
            "num_classes": run.num_classes,
            "num_train": run.n,
            "num_val": int(yv.numel()),
            "skipped_images": {"train_batches_total": run.skipped, "val": val_skips.num_skipped},
            "history": run.history[-5:],
            "train_seconds": t_train,
            "total_seconds": time.time() - t0,
        },
    )
