"""End-to-end fine-tuning for classification: the MAE / BEiT recipe.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, appendix A.3 (Table 9),
following Bao et al., "BEiT", ICLR 2022: AdamW (betas 0.9, 0.999; weight decay 0.05) with
``lr = base_lr * batch / 256`` (base_lr 5e-4 for ViT-B, 1e-3 for ViT-L; batch 1024), layer-wise
lr decay (0.65 ViT-B, 0.75 ViT-L; the scale of a layer is ``decay^(L + 1 - layer)``, groups from
the encoder wrapper's ``layer_id`` so Swin and BEiT work too), drop path (0.1 ViT-B, 0.2 ViT-L),
RandAugment (m9, mstd 0.5), mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25,
100 epochs for ViT-B / 50 for ViT-L with 5 warmup epochs then a per-iteration half-cosine to
``min_lr`` 1e-6. The classifier reads the global average of the patch tokens through a LayerNorm
(``fc_norm``; the encoder's final norm is skipped, as in MAE's ``global_pool``) and is initialized
with std 2e-5. Augmentation, mixup / cutmix and the losses are timm's. Top-1 and top-5 on val
after the last epoch are reported (no selection on val).

Values marked "auto" in :class:`FinetuneConfig` take the ViT-B setting for encoders with fewer
than 24 blocks and the ViT-L one otherwise; the record holds the resolved values.

Resume works as in pretraining: a checkpoint (model, optimizer, step) is written every
``ckpt_every_steps`` steps into the task directory, and data order, augmentation, mixup and
drop path are functions of (seed, epoch / step, index), so a resumed run follows the
uninterrupted one; a checkpoint of another config or encoder is refused
(:func:`downstream.resume.task_checkpoint`).

Data parallel under ``torchrun`` (:mod:`harness.core.distributed`; the runner runs this task on
every rank, :attr:`Task.data_parallel`), the pretraining engine's convention: ``batch_size`` is the
global batch, cut into micro-batches of ``micro_batch_size`` (at most ``batch_size / ranks``), and
rank ``r`` of ``w`` takes micro-batches ``r, r + w, ...`` of each step. Mixup / cutmix and drop path
of a micro-batch are seeded by its index in the step, not by the rank, so ``w`` ranks compute the
micro-batches of one process with ``micro_batch_size = batch_size / w`` and their averaged
gradient is that process's accumulated one. The model is wrapped in DistributedDataParallel, or
sharded with one FSDP unit per block (``fsdp``, :func:`harness.core.parallel.shard_blocks`);
checkpoints hold full state dicts either way (resume and the saved classifier read as without
it). Validation is split over the ranks and its logits gathered, so every rank reports the same
metric. Rank 0 alone logs and writes files (checkpoints atomically, the classifier).

A non-finite loss (any micro-batch of a step, on any rank: one verdict for all) follows
``nonfinite``, the pretraining's policy (:class:`harness.core.training.NonfinitePolicy`): ``stop``
raises naming the step; ``skip`` makes no update that step and counts it; ``restore`` reloads the
last checkpoint (a fresh run writes one at step 0) and multiplies the lr by
``nonfinite_lr_factor``; more than ``nonfinite_max_events`` in a row stop the run. Each event is
logged and listed in the checkpoint and the record (``details.nonfinite``).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, SerializerFunctionWrapHandler, model_serializer
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from downstream.classifier import SavedClassifier, register_classifier, save_classifier
from downstream.linear_probe import topk_accuracy
from harness.core import distributed, parallel
from harness.core.config import ConfigError, DataConfig, EncoderConfig, TaskConfig
from harness.core.config.base import omit_at_default
from harness.core.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    FullySeededDataset,
    SkipTally,
    check_classification_data,
    collate_skipping,
    eval_transform,
    imagefolder_checked,
    imagefolder_classes,
    resolve_imagefolder_root,
)
from harness.core.data.fastdecode import with_draft_crop
from harness.core.errors import CheckpointError
from harness.core.tracking import ScalarLogger, progress
from harness.core.training import (
    GradAccumulation,
    NonfinitePolicy,
    ResumableCheckpoint,
    autocast,
    autocast_dtype,
    clip_and_step,
    epoch_batches,
    lr_at,
    scaled_lr,
    set_lr,
    steps_per_epoch,
)
from pretrain.encoders import create_encoder
from pretrain.encoders.base import Encoder
from pretrain.engine import local_batch_size

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .resume import task_checkpoint

#: Per-size paper settings: (epochs, base_lr, layer_decay, drop_path).
PAPER_SETTINGS: dict[str, dict[str, float]] = {
    "base": {"epochs": 100, "base_lr": 5e-4, "layer_decay": 0.65, "drop_path": 0.1},
    "large": {"epochs": 50, "base_lr": 1e-3, "layer_decay": 0.75, "drop_path": 0.2},
}


class FinetuneConfig(TaskConfig):
    """Fine-tuning (see :mod:`downstream.finetune`). ``None`` means the paper value for the
    encoder's size: ViT-B's below 24 blocks, ViT-L's from 24 (:data:`PAPER_SETTINGS`).

    Attributes:
        epochs: Training epochs (auto: 100 ViT-B, 50 ViT-L).
        warmup_epochs: Linear warmup (5).
        batch_size: Effective batch (1024).
        micro_batch_size: Images per forward; gradients are accumulated to ``batch_size``
            (None: no accumulation). Mixup / cutmix act within a micro-batch.
        base_lr: Per 256 images (auto: 5e-4 ViT-B, 1e-3 ViT-L).
        min_lr: Floor of the cosine schedule (1e-6).
        layer_decay: Layer-wise lr decay (auto: 0.65 ViT-B, 0.75 ViT-L).
        weight_decay: AdamW weight decay (0.05; none on biases, norms, tokens, position tables).
        betas: AdamW betas.
        drop_path: Stochastic depth rate, linear over the blocks (auto: 0.1 ViT-B, 0.2 ViT-L).
        clip_grad: Gradient norm clip (None, as MAE).
        global_pool: Average patch tokens + fc_norm (MAE) instead of the class token.
        mixup: Mixup alpha (0.8). cutmix: CutMix alpha (1.0). mixup_prob: Probability of
            mixing a batch. mixup_switch_prob: Probability of cutmix instead of mixup.
        smoothing: Label smoothing (0.1).
        crop_scale: RandomResizedCrop scale range (timm's / MAE's default (0.08, 1)).
        auto_augment: timm policy (``rand-m9-mstd0.5-inc1``); None disables it.
        color_jitter: Color jitter strength (None: off, as with RandAugment in MAE).
        reprob: Random erasing probability (0.25), ``remode`` / ``recount`` its mode / count.
        head_init_std: Std of the classifier's init (2e-5).
        eval_every_epochs: Also evaluate val every n epochs for the details (0: only at the end).
        max_steps: Stop after this many optimizer steps (smoke runs).
        ckpt_every_steps: Checkpoint interval for resuming.
        keep_checkpoint: Keep the last checkpoint after a successful run.
        log_every_steps: Progress line interval.
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16``.
        num_workers: Loader workers (None: the data config's).
        strict_data: Unreadable image files are fatal instead of skipped and counted.
        activation_checkpointing: Recompute each encoder block's activations in the backward
            pass instead of storing them (memory for compute; the same gradients). Left out of
            dumps and hashes while off, so runs recorded before it existed keep their keys.
        fsdp: Under torchrun, shard parameters, gradients and optimizer state over the ranks
            (PyTorch's ``fully_shard``, one unit per encoder block) instead of DDP; ignored by
            one process. Left out of dumps while off.
        nonfinite: What a non-finite loss does: ``stop`` (raise, naming the step), ``skip`` (no
            update this step, counted), ``restore`` (reload the last checkpoint, lr times
            ``nonfinite_lr_factor`` from then on). The three are left out of dumps at their
            defaults.
        nonfinite_lr_factor: The lr multiplier of each ``restore`` event.
        nonfinite_max_events: Consecutive non-finite events (no finite step between) after which
            ``skip`` and ``restore`` give up with the ``stop`` error.
    """

    #: Added after runs were recorded: dropped from dumps while at their default.
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        "activation_checkpointing", "fsdp", "nonfinite", "nonfinite_lr_factor",
        "nonfinite_max_events",
    )  # fmt: skip

    name: Literal["finetune"] = "finetune"
    epochs: int | None = Field(None, ge=1)
    warmup_epochs: float = Field(5, ge=0)
    batch_size: int = Field(1024, ge=2)
    micro_batch_size: int | None = Field(None, ge=2)
    base_lr: float | None = Field(None, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    layer_decay: float | None = Field(None, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float | None = Field(None, ge=0, lt=1)
    clip_grad: float | None = None
    global_pool: bool = True
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    mixup_prob: float = Field(1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = None
    reprob: float = Field(0.25, ge=0, le=1)
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = Field(1, ge=1)
    head_init_std: float = Field(2e-5, gt=0)
    eval_every_epochs: int = Field(0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    ckpt_every_steps: int = Field(500, ge=1)
    keep_checkpoint: bool = False
    log_every_steps: int = Field(20, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_workers: int | None = Field(None, ge=0)
    strict_data: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    nonfinite: Literal["stop", "skip", "restore"] = "stop"
    nonfinite_lr_factor: float = Field(0.5, gt=0, lt=1)
    nonfinite_max_events: int = Field(3, ge=1)

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at_default(self, handler(self), self.OMIT_AT_DEFAULT)


def resolve_settings(cfg: FinetuneConfig, num_layers: int) -> dict[str, Any]:
    """The ``auto`` values for an encoder with ``num_layers`` blocks, merged with ``cfg``."""
    size = "large" if num_layers >= 24 else "base"
    paper = PAPER_SETTINGS[size]
    return {
        "size": size,
        "epochs": int(cfg.epochs if cfg.epochs is not None else paper["epochs"]),
        "base_lr": float(cfg.base_lr if cfg.base_lr is not None else paper["base_lr"]),
        "layer_decay": float(
            cfg.layer_decay if cfg.layer_decay is not None else paper["layer_decay"]
        ),
        "drop_path": float(cfg.drop_path if cfg.drop_path is not None else paper["drop_path"]),
    }


# --------------------------------------------------------------------------- model


def set_drop_path(encoder: Encoder, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks (timm's rule)."""
    from timm.layers import DropPath

    blocks = encoder.residual_blocks()
    for i, blk in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2", "drop_path"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


class FinetuneModel(nn.Module):
    """Encoder + (average pool + fc_norm | class token) + linear classifier.

    Args:
        encoder: An encoder wrapper (a copy: fine-tuning changes its weights).
        num_classes: Classes.
        global_pool: MAE's global pooling: mean of the patch tokens before the final norm, then
            a new LayerNorm (Swin: mean of the normed output tokens, its usual head).
        head_init_std: Classifier weight init std.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        global_pool: bool = True,
        head_init_std: float = 2e-5,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.global_pool = global_pool
        dim = int(encoder.num_features)  # type: ignore[arg-type]
        has_prefix = encoder.num_prefix_tokens > 0
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if global_pool and has_prefix else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]``."""
        enc = self.encoder
        if not self.global_pool:
            return enc.pool(enc.forward_features(x), "cls")  # type: ignore[operator]
        return enc.global_pool(x, self.fc_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_classifier("finetune")
def finetune_classifier(encoder: Encoder, saved: SavedClassifier) -> nn.Module:
    """The fine-tuned model: a copy of ``encoder``'s architecture with the saved weights (the
    fine-tuned encoder, its pooling norm and head); ``encoder`` itself is left unchanged."""
    model = FinetuneModel(copy.deepcopy(encoder).cpu(), len(saved.classes),
                          bool(saved.spec["global_pool"]))  # fmt: skip
    model.load_state_dict(saved.state)
    return model


def param_groups_layer_decay(
    model: FinetuneModel, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay^(L + 1 - layer_id)`` (BEiT / MAE).

    No weight decay on 1-d parameters (biases, norms), tokens, position embeddings and relative
    position tables (the encoder's ``no_weight_decay``).
    """
    enc = model.encoder
    num_layers = int(enc.num_layers)  # type: ignore[arg-type]
    skip = {f"encoder.{n}" for n in enc.no_weight_decay()}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = (
            enc.layer_id(name.removeprefix("encoder."))
            if name.startswith("encoder.")
            else num_layers + 1
        )  # type: ignore[operator]
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------- data


def _posterize_compat(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits giving the black image older Pillow returned (Pillow >= 11
    rejects ``bits=0``, which RandAugment's increasing posterize asks for at magnitude 10)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def pillow_safe(transform: Any) -> Any:
    """Point the posterize ops of a timm RandAugment inside ``transform`` at the compatible one."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize_compat
    return transform


def _seed_step(seed: int, step: int, device: torch.device) -> None:
    """Mixup / cutmix (numpy) and drop path (torch) draws of one step."""
    s = (seed * 9_999_991 + step * 7_777 + 13) % (2**32 - 1)
    np.random.seed(s)
    random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp: torch.dtype | None,
    log: Any = None,
    lockstep: torch.Tensor | None = None,
) -> tuple[float, float, int, int]:
    """``(top1, top5, images, skipped)`` on a loader of ``(x, y, kept)`` batches over a checked
    ImageFolder, in the order of its sampler (unreadable files are named on ``log`` when given).

    Under torchrun each rank's loader holds its share of the split (:func:`_val_loader`); the
    logits are gathered, so every rank returns the metric of the whole split.

    Args:
        lockstep: For a sharded model, whose forward is a collective: an input ``[1, 3, H, W]``
            that a rank forwards (and drops) whenever it has no batch while another has, so
            every rank runs the same number of forwards. None: each rank runs its own batches.
    """

    model.eval()
    logits, labels = [], []
    skips = SkipTally(loader.dataset, "val")
    order = list(loader.sampler)
    batches = iter(loader)
    rounds = len(loader)
    if lockstep is not None:
        rounds = max(distributed.all_gather_object(rounds))
    for _ in range(rounds):
        x, y, keep = next(batches, (None, None, None))
        if keep is not None:
            skips.add(order[skips.seen : skips.seen + len(keep)], keep)
        if x is None or x.numel() == 0:
            if lockstep is not None:
                model(lockstep.to(device))
            continue
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu())
        labels.append(y)
    if log is not None:
        skips.report(log)
    skips.check_readable()
    parts = distributed.all_gather_object(
        (torch.cat(logits) if logits else None, torch.cat(labels) if labels else None,
         skips.num_skipped)
    )  # fmt: skip
    lv = torch.cat([p[0] for p in parts if p[0] is not None])
    yv = torch.cat([p[1] for p in parts if p[1] is not None])
    skipped = sum(p[2] for p in parts)
    return topk_accuracy(lv, yv, 1), topk_accuracy(lv, yv, 5), int(yv.numel()), skipped


# --------------------------------------------------------------------------- task


@register_task("finetune")
class Finetune(Task):
    """MAE / BEiT fine-tuning (see the module docstring)."""

    name = "finetune"
    version = 1
    metrics = {"top1": True, "top5": True}
    config_cls = FinetuneConfig
    data_parallel = True

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """``epochs`` (the paper's for the encoder's depth when unset) x the full batches of
        train; the evaluation passes are not counted."""
        assert isinstance(cfg, FinetuneConfig)
        with torch.device("meta"):  # the depth only: no weights are allocated
            layers = int(create_encoder(encoder).num_layers)
        epochs = int(resolve_settings(cfg, layers)["epochs"])
        return epochs * (n_train // cfg.batch_size) * cfg.batch_size

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """One step of the MAE / BEiT recipe: forward and backward through the whole encoder
        with drop path 0.1, pooling, fc-norm and head, label smoothing 0.1, AdamW with
        layer-wise lr decay 0.65 (weight decay 0.05)."""
        set_drop_path(encoder, 0.1)
        model = FinetuneModel(encoder, batch.num_classes).to(batch.images.device).train()
        groups = param_groups_layer_decay(model, 0.05, 0.65)
        adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=1e-4)

        def step() -> None:
            with batch.autocast():
                logits = model(batch.images)  # [B, C]
                loss = nn.functional.cross_entropy(logits, batch.labels, label_smoothing=0.1)
            adamw.zero_grad(set_to_none=True)
            loss.backward()
            adamw.step()

        return step

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, FinetuneConfig)
        t0 = time.time()
        run = _setup(encoder, cfg, ctx)
        _restore(run)
        run.log(
            f"[finetune] {run.n} images, {run.num_classes} classes, {run.steps_per_epoch} "
            f"steps/epoch, {run.total} steps, batch {cfg.batch_size} ({run.micro_per_step} x "
            f"{run.micro}), lr {run.peak:.3g}, layer decay {run.settings['layer_decay']}, drop "
            f"path {run.settings['drop_path']}, device {run.device}{' bf16' if run.amp else ' fp32'}"
            + _parallel_note(run)
        )
        t_train0 = time.time()
        _train(run)
        result = _finish(run, time.time() - t_train0, t0)
        state = parallel.model_state(run.model)  # a collective under FSDP: full tensors on rank 0
        if run.rank == 0:
            classes = imagefolder_classes(resolve_imagefolder_root(ctx.data), "train")
            save_classifier(ctx.out_dir, SavedClassifier(
                "finetune", classes, {"global_pool": cfg.global_pool}, state))  # fmt: skip
        distributed.barrier()
        return result


@dataclass
class _FinetuneRun:
    """One fine-tuning between :func:`_setup` and :func:`_finish`: what the steps read and
    change (the step count, the loss history, the evaluations, the skipped images)."""

    cfg: FinetuneConfig
    ctx: TaskContext
    log: Callable[[str], Any]  # ctx.log on rank 0, silent on the others
    rank: int
    world: int
    settings: dict[str, Any]
    device: torch.device
    amp: torch.dtype | None
    seeded: FullySeededDataset
    train_skips: SkipTally
    vloader: DataLoader
    workers: int
    num_classes: int
    n: int
    micro: int
    micro_per_step: int  # micro-batches of one step over all ranks
    accum: GradAccumulation  # over this rank's micro-batches of a step
    steps_per_epoch: int
    total: int
    warmup: float
    peak: float
    model: FinetuneModel  # sharded in place under FSDP
    net: nn.Module  # what the steps call: the model, or its DDP wrapper
    fsdp: bool
    opt: torch.optim.Optimizer
    mixer: Any
    criterion: nn.Module
    ckpt: ResumableCheckpoint
    nonfinite: NonfinitePolicy
    step: int = 0
    restart: bool = False  # a checkpoint was restored: the loop goes on from run.step
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0


def _train_transform(cfg: FinetuneConfig, img: int) -> Any:
    """timm's fine-tuning augmentation: RandomResizedCrop, RandAugment, random erasing."""
    return pillow_safe(
        create_transform(
            img,
            is_training=True,
            scale=cfg.crop_scale,
            auto_augment=cfg.auto_augment,
            color_jitter=cfg.color_jitter,
            interpolation="bicubic",
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
    )


def _mixer_and_criterion(cfg: FinetuneConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """timm's batch Mixup / CutMix (None when both are off) and the loss that fits it."""
    mixer = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixer = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode="batch",
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
    if mixer is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return mixer, criterion


def _setup(
    encoder: Any,
    cfg: FinetuneConfig,
    ctx: TaskContext,
    trainable_blocks: int | None = None,
    ckpt_name: str = "finetune_checkpoint.pth",
) -> _FinetuneRun:
    """Data, schedule, the model (a copy of the encoder), optimizer, mixing and loss.

    Args:
        encoder: The encoder (copied: its weights stay as they are).
        cfg: The fine-tuning recipe.
        ctx: Data, seed, device, task directory.
        trainable_blocks: Fine-tune only the last k blocks (with the final norm and the head;
            MAE's partial fine-tuning, Fig. 9), the rest frozen; None: every weight.
        ckpt_name: The resumable checkpoint's file in the task directory.

    Raises:
        ConfigError: ``micro_batch_size`` does not divide ``batch_size`` (under torchrun: its
            share per rank), or the train split holds less than one batch.
    """
    device = ctx.device
    rank, world = distributed.get_rank(), distributed.get_world_size()
    settings = resolve_settings(cfg, int(encoder.num_layers))
    img = int(encoder.cfg.img_size)
    root = resolve_imagefolder_root(ctx.data)
    strict = cfg.strict_data or ctx.data.strict_data
    train_tf = _train_transform(cfg, img)
    if ctx.data.fast_decode:  # the crop decodes JPEGs at reduced size; the later stages as they are
        train_tf = with_draft_crop(train_tf)
    train = imagefolder_checked(root, "train", train_tf, strict)
    val = imagefolder_checked(root, "val", eval_transform(img, ctx.data.eval_crop_pct), strict)
    num_classes = len(train.classes)
    n = len(train)
    local = local_batch_size(cfg.batch_size, world, f"{cfg.name}.batch_size")  # a rank's share
    micro = min(cfg.micro_batch_size or cfg.batch_size, local)
    if local % micro:
        per_rank = f" (its {local} per rank of the {world} processes)" if world > 1 else ""
        raise ConfigError(
            f"micro_batch_size {micro} must divide batch_size {cfg.batch_size}{per_rank}: set "
            f"micro_batch_size to a divisor of {local}"
        )
    spe = steps_per_epoch(n, cfg.batch_size, "lower batch_size (the lr scales with it)")
    total = settings["epochs"] * spe
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    peak = scaled_lr(settings["base_lr"], cfg.batch_size)

    # the model: a copy of the encoder (its weights change), drop path, every weight trained
    enc = copy.deepcopy(encoder).cpu()
    set_drop_path(enc, settings["drop_path"])
    for pname, p in enc.named_parameters():
        p.requires_grad_(pname != "mask_token" and trains(enc, pname, trainable_blocks))
    if cfg.activation_checkpointing:
        parallel.checkpoint_blocks(enc.residual_blocks())
    torch.manual_seed(ctx.seed)
    model = FinetuneModel(enc, num_classes, cfg.global_pool, cfg.head_init_std).to(device)
    net = _data_parallel(model, cfg.fsdp and world > 1, device)  # after activation checkpointing
    groups = param_groups_layer_decay(model, cfg.weight_decay, settings["layer_decay"])
    opt = torch.optim.AdamW(  # after fully_shard: over the sharded parameters
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=peak, betas=cfg.betas
    )
    mixer, criterion = _mixer_and_criterion(cfg, num_classes)
    workers = ctx.data.num_workers if cfg.num_workers is None else cfg.num_workers
    return _FinetuneRun(
        cfg=cfg,
        ctx=ctx,
        log=ctx.log if rank == 0 else _silent,
        rank=rank,
        world=world,
        settings=settings,
        device=device,
        amp=autocast_dtype(cfg.precision, device),
        seeded=FullySeededDataset(train, ctx.seed),
        train_skips=SkipTally(train, "train"),
        vloader=_val_loader(val, micro, workers, rank, world),
        workers=workers,
        num_classes=num_classes,
        n=n,
        micro=micro,
        micro_per_step=cfg.batch_size // micro,
        accum=GradAccumulation(local // micro),
        steps_per_epoch=spe,
        total=total,
        warmup=cfg.warmup_epochs * spe,
        peak=peak,
        model=model,
        net=net,
        fsdp=parallel.is_sharded(model),
        opt=opt,
        mixer=mixer,
        criterion=criterion,
        ckpt=task_checkpoint(ctx.out_dir / ckpt_name, cfg, encoder, ctx.data, ctx.seed),
        nonfinite=NonfinitePolicy(cfg.nonfinite, cfg.nonfinite_lr_factor, cfg.nonfinite_max_events),
    )


def _data_parallel(model: FinetuneModel, fsdp: bool, device: torch.device) -> nn.Module:
    """What the steps call under torchrun: ``model`` sharded in place (FSDP: one unit per encoder
    block, then the root; :func:`harness.core.parallel.shard_blocks`, the pretraining's) or
    wrapped in DistributedDataParallel; ``model`` itself for one process."""
    if distributed.get_world_size() == 1:
        return model
    if fsdp:
        parallel.shard_blocks(model, model.encoder.residual_blocks(), device)
        return model
    # the encoder's final norm gets no gradient under global pooling: DDP must look for it
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _val_loader(val: Any, micro: int, workers: int, rank: int, world: int) -> DataLoader:
    """Validation in order; under torchrun, rank ``r`` of ``w`` reads images ``r, r + w, ...``
    (:func:`evaluate` gathers the logits)."""
    share = list(range(rank, len(val), world)) if world > 1 else None
    return DataLoader(val, batch_size=micro, shuffle=False, sampler=share, num_workers=workers,
                      collate_fn=collate_skipping)  # fmt: skip


def _parallel_note(run: _FinetuneRun) -> str:
    """The start line's note on data parallelism and memory settings."""
    notes = [f"ranks={run.world} (batch {run.cfg.batch_size // run.world} each)"] if run.world > 1 else []
    notes += ["fsdp"] if run.fsdp else []
    if run.cfg.fsdp and not run.fsdp:
        notes.append("fsdp off (one process: nothing to shard)")
    notes += ["activation-checkpointing"] if run.cfg.activation_checkpointing else []
    return (", " + " ".join(notes)) if notes else ""


def _silent(msg: str) -> None:
    """The logger of ranks > 0."""


def trains(encoder: Encoder, name: str, trainable_blocks: int | None) -> bool:
    """Whether encoder parameter ``name`` is fine-tuned when only the last ``trainable_blocks``
    blocks are (None: every weight): its layer id (:meth:`Encoder.layer_id`) lies above the
    frozen ones, so the final norm trains with any k and the embeddings (layer id 0) only with
    None, even when k reaches the encoder's depth."""
    if trainable_blocks is None:
        return True
    return encoder.layer_id(name) > int(encoder.num_layers) - trainable_blocks


def _restore(run: _FinetuneRun) -> None:
    """Continue from the task directory's checkpoint when there is one.

    Raises:
        CheckpointError: The checkpoint was written by another config or encoder.
    """
    # rank 0 decides; under torchrun every rank loads the same file
    if not distributed.broadcast_object(run.ckpt.exists()):
        if run.cfg.nonfinite == "restore":  # what a non-finite loss before any checkpoint restores
            _save_checkpoint(run)
        return
    run.nonfinite.load_state(_load_state(run))
    run.log(f"[finetune] resumed at step {run.step}/{run.total} from {run.ckpt.path}")


def _load_state(run: _FinetuneRun) -> dict[str, Any]:
    """Model, optimizer, step, history, evaluations and skip count from the checkpoint (every
    rank reads the file; full state dicts, loaded into a sharded model as into any other);
    returns the checkpoint.

    Raises:
        CheckpointError: This rank cannot see the file rank 0 wrote.
    """
    if not run.ckpt.exists():
        raise CheckpointError(
            f"rank {run.rank} cannot see {run.ckpt.path}, which rank 0 resumes from: the output "
            "directory must be on a file system every node shares"
        )
    ck = run.ckpt.load()
    assert ck is not None
    parallel.load_model_state(run.model, ck["model"])
    parallel.load_optimizer_state(run.model, run.opt, ck["optimizer"])
    run.step, run.history, run.evals = int(ck["step"]), list(ck["history"]), list(ck["evals"])
    run.skipped = int(ck["skipped"])
    return ck


def _save_checkpoint(run: _FinetuneRun) -> None:
    """The resumable state (a collective under torchrun: every rank calls it, rank 0 writes)."""
    state = {
        "model": parallel.model_state(run.model),  # full tensors, under FSDP too
        "optimizer": parallel.optimizer_state(run.model, run.opt),
        "step": run.step,
        "history": run.history,
        "evals": run.evals,
        "skipped": run.skipped,
        **run.nonfinite.state(),
    }
    if run.rank == 0:
        run.ckpt.save(state)


def _train(run: _FinetuneRun) -> None:
    """Optimizer steps until ``total``: each epoch's seeded order from the step reached on,
    ``accum`` micro-batches per step (under torchrun: this rank's micro-batches of each step)."""
    cfg, ctx = run.cfg, run.ctx
    t_train0 = time.time()
    step_at_start = run.step
    scalars = ScalarLogger(ctx.out_dir, run_name=ctx.out_dir.name, enabled=run.rank == 0)
    bar = progress(total=run.total, initial=run.step, desc="finetune", unit="step",
                   enabled=run.rank == 0)  # fmt: skip
    try:
        while run.step < run.total:
            epoch, batch_idx = divmod(run.step, run.steps_per_epoch)
            run.seeded.set_epoch(epoch)
            micro_batches = epoch_batches(
                run.n, ctx.seed, epoch, cfg.batch_size, batch_idx, micro=run.micro
            )[run.rank :: run.world]  # every rank's share of each step
            step_skipped, bad = 0, None  # bad: a non-finite loss of the step
            loader = DataLoader(
                run.seeded,
                batch_sampler=micro_batches,
                num_workers=run.workers,
                collate_fn=collate_skipping,
                pin_memory=run.device.type == "cuda",
            )
            run.model.train()
            for i, (x, y, keep) in enumerate(loader):
                if run.accum.starts(i):
                    lr = run.nonfinite.lr_scale * lr_at(
                        run.step, run.total, run.warmup, run.peak, cfg.min_lr
                    )
                    set_lr(run.opt, lr)
                step_skipped += int((~keep).sum())
                run.train_skips.add(micro_batches[i], keep)
                run.train_skips.report(run.log)  # each unreadable file named once
                run.train_skips.check_readable()
                with parallel.gradient_sync_unless(run.net, last=run.accum.ends(i)):
                    loss = _micro_step(run, x, y, i)
                last_loss = math.nan if loss is None else loss  # nan: no readable image
                if bad is None and loss is not None and not math.isfinite(loss):
                    bad = loss
                if not run.accum.ends(i):
                    continue
                last_loss, step_skipped, bad = _step_verdict(run, last_loss, step_skipped, bad)
                run.skipped += step_skipped
                step_skipped = 0
                if bad is not None:
                    _on_nonfinite(run, bad, lr)
                    bad = None
                    if run.restart:  # a restored checkpoint: the epoch's loader from run.step
                        run.restart = False
                        bar.n = run.step
                        bar.refresh()
                        break
                    bar.update(1)
                    _after_step(run, epoch, math.nan, lr, scalars, step_at_start, t_train0)
                    if run.step >= run.total:
                        break
                    continue
                clip_and_step(run.opt, run.model.parameters(), cfg.clip_grad)
                run.opt.zero_grad(set_to_none=True)
                run.step += 1
                run.history.append({"step": run.step, "loss": last_loss, "lr": lr})
                run.nonfinite.stepped(run.step)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
                scalars.scalars({"finetune/loss": last_loss, "finetune/lr": lr}, run.step)
                _after_step(run, epoch, last_loss, lr, scalars, step_at_start, t_train0)
                if run.step >= run.total:
                    break
    finally:
        bar.close()
        scalars.close()


def _micro_step(run: _FinetuneRun, x: torch.Tensor, y: torch.Tensor, i: int) -> float | None:
    """Forward and backward of micro-batch ``i`` of this rank's share of the step (``x``:
    ``[b, 3, H, W]``); its loss, which may be non-finite (the caller's verdict: the backward runs
    all the same, so every rank takes part in the gradient reduction), or None when no image of
    it was readable.

    Raises:
        DatasetError: Under torchrun, no image of the micro-batch was readable (a rank cannot
            sit out a data-parallel backward).
    """
    if x.shape[0] % 2 and run.mixer is not None:  # batch mixing pairs samples up
        x, y = x[:-1], y[:-1]
    if x.shape[0] == 0:
        if run.world > 1:
            raise DatasetError(
                f"step {run.step}: no image of a micro-batch of rank {run.rank} is readable (or "
                "one is left, which mixup cannot pair), which data-parallel fine-tuning cannot "
                "skip; remove the unreadable files (named above) or raise micro_batch_size"
            )
        return None
    # the micro-batch's index in the step over all ranks (rank r holds r, r + w, ...)
    index = (i % run.accum.k) * run.world + run.rank
    _seed_step(run.ctx.seed, run.step * run.micro_per_step + index, run.device)
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if run.mixer is not None:
        x, y = run.mixer(x, y)
    with autocast(run.device, run.amp):
        loss = run.criterion(run.net(x), y)
    run.accum.backward(loss)
    return float(loss.item())


def _step_verdict(
    run: _FinetuneRun, last_loss: float, skipped: int, bad: float | None
) -> tuple[float, int, float | None]:
    """What every rank agrees on at the end of a step: the loss of its last micro-batch (the last
    rank's), the unreadable images of all ranks, and a non-finite loss of any rank (or None)."""
    if run.world == 1:
        return last_loss, skipped, bad
    gathered = distributed.all_gather_object((last_loss, skipped, bad))
    worst = next((g[2] for g in gathered if g[2] is not None), None)
    return gathered[-1][0], sum(g[1] for g in gathered), worst


def _on_nonfinite(run: _FinetuneRun, value: float, lr: float) -> None:
    """A non-finite loss at step ``run.step`` under ``nonfinite``
    (:class:`harness.core.training.NonfinitePolicy`, the pretraining's): ``skip`` counts the step
    without an update, ``restore`` reloads the last checkpoint and lowers the lr (the loop goes
    on from its step); each is an event in the log, the checkpoint and the record.

    Raises:
        FloatingPointError: ``stop``, or more than ``nonfinite_max_events`` events in a row.
    """
    run.opt.zero_grad(set_to_none=True)
    at = run.step

    def reload() -> int:
        _load_state(run)  # the events and lr scale stay this run's
        run.restart = True
        return run.step

    run.step, what = run.nonfinite.handle(at, value, lr, run.ckpt.path if run.ckpt.exists() else None, reload)
    run.log(f"[finetune] step {at}: loss is {value}; {what}")


def _after_step(
    run: _FinetuneRun,
    epoch: int,
    last_loss: float,
    lr: float,
    scalars: ScalarLogger,
    step_at_start: int,
    t_train0: float,
) -> None:
    """Checkpoint, progress line and the optional per-epoch evaluation after a step."""
    cfg, step = run.cfg, run.step
    if step % cfg.ckpt_every_steps == 0 or step == run.total:
        _save_checkpoint(run)
    if step % cfg.log_every_steps == 0 or step == run.total:
        rate = (step - step_at_start) * cfg.batch_size / max(time.time() - t_train0, 1e-9)
        run.log(
            f"[finetune] step {step}/{run.total} epoch {epoch} loss {last_loss:.4f} "
            f"lr {lr:.3g} {rate:.1f} img/s"
        )
    epoch_done = step % run.steps_per_epoch == 0
    if (
        cfg.eval_every_epochs
        and epoch_done
        and (step // run.steps_per_epoch) % cfg.eval_every_epochs == 0
        and step < run.total
    ):
        top1, top5, _, _ = _evaluate(run)
        run.evals.append({"epoch": step // run.steps_per_epoch, "top1": top1, "top5": top5})
        scalars.scalars({"finetune/val_top1": top1, "finetune/val_top5": top5}, step)
        run.log(f"[finetune] epoch {step // run.steps_per_epoch}: val top1 {top1:.2f}")
        run.model.train()


def _evaluate(run: _FinetuneRun, log: Any = None) -> tuple[float, float, int, int]:
    """:func:`evaluate` of the model being tuned (every rank calls it; under FSDP in lockstep)."""
    img = int(run.model.encoder.cfg.img_size)
    lockstep = torch.zeros(1, 3, img, img) if run.fsdp else None
    return evaluate(run.model, run.vloader, run.device, run.amp, log, lockstep)


def _finish(run: _FinetuneRun, t_train: float, t0: float) -> TaskResult:
    """Evaluate val after the last step, drop the checkpoint (unless kept), and report."""
    cfg, step = run.cfg, run.step
    top1, top5, n_val, val_skipped = _evaluate(run, run.log)
    run.evals.append({"epoch": step / run.steps_per_epoch, "top1": top1, "top5": top5})
    run.log(f"[finetune] val top1 {top1:.2f} top5 {top5:.2f} after {step} steps")
    if not cfg.keep_checkpoint and run.rank == 0 and run.ckpt.exists():
        run.ckpt.path.unlink()
    losses = [h["loss"] for h in run.history if not math.isnan(h["loss"])]
    return TaskResult(
        metrics={"top1": top1, "top5": top5},
        details={
            "resolved": {
                **run.settings,
                "lr": run.peak,
                "batch_size": cfg.batch_size,
                "accum": run.micro_per_step,
                **({"world_size": run.world, "fsdp": run.fsdp} if run.world > 1 else {}),
                "steps": step,
                "warmup_steps": run.warmup,
            },
            "num_classes": run.num_classes,
            "num_train": run.n,
            "num_val": n_val,
            "skipped_images": {"train_batches_total": run.skipped, "val": val_skipped},
            **({"nonfinite": run.nonfinite.summary()} if cfg.nonfinite != "stop" else {}),
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "evals": run.evals,
            "train_seconds": t_train,
            "total_seconds": time.time() - t0,
        },
    )
