"""The pretraining engine: an explicit training loop in the style of MAE's ``engine_pretrain``.

* AdamW with the papers' linear lr scaling ``lr = base_lr * batch / lr_base_batch``
  (MAE: per 256; SimMIM: per 512), no weight decay on biases, norms, position embeddings and
  tokens (MAE's ``param_groups_weight_decay``).
* Per-iteration schedule: linear warmup then half-cosine to ``min_lr`` (MAE's ``lr_sched``).
* bf16 autocast on a GPU (fused attention through timm's SDPA), fp32 on CPU.
* Checkpoints every ``ckpt_every_steps`` and at the end hold model, optimizer, step and RNG
  states; the data order, augmentation and masks are functions of (seed, epoch/step, index), so a
  resumed run reproduces the uninterrupted loss curve. A checkpoint of another config is refused
  (:class:`harness.core.training.ResumableCheckpoint`, the policy of every training loop).
* The loop reads as MAE's: :func:`pretrain` is setup (:func:`_setup`), restore
  (:func:`_restore`), the steps (:func:`_train`, :func:`_train_step`) and :func:`_finish`;
  ``accum_steps`` accumulates gradients over micro-batches of each step.
* Recipes whose target needs fitting first (BEiT's tokenizers trained here) fit it at the start
  of a fresh run on seeded training images (``model.prepare``); the fitted tokenizer lives in the
  model's state, so a resumed run restores it from the checkpoint.
* Data parallel under ``torchrun`` (:mod:`harness.core.distributed`): ``train.batch_size`` is the
  global batch; each rank takes its disjoint slice of the same seeded global order and of the
  masks generated for the whole global batch, the model is wrapped in DistributedDataParallel
  (gradients averaged over equal slices = the gradient of the global mean loss), the logged loss
  is the mean over ranks, and only rank 0 writes files. Every rank loads the checkpoint on resume;
  checkpoints also hold each rank's RNG state.
* At the end: the encoder alone under timm's key names (``encoder.pth``: the student, or the EMA
  teacher where ``recipe.teacher.evaluate`` says so, named in the summary) and a PNG grid of
  original / masked / the recipe's rows (pixel targets: reconstruction and reconstruction with
  the visible patches pasted; HOG, colors and tokens: target and prediction drawn; latent
  targets: the masks only, plus ``target_stats.png``, the target std and the student-teacher
  cosine per step; steps whose target std falls below ``recipe.teacher.collapse_std`` are
  logged and counted in the summary).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from harness.core import distributed
from harness.core.config import ConfigError, PretrainConfig, dump_config, to_plain
from harness.core.data.datasets import (
    DatasetError,
    MultiView,
    SeededDataset,
    SkipTally,
    all_unreadable_error,
    collate_skipping,
    eval_transform,
    imagefolder_checked,
    pretrain_transform,
    resolve_imagefolder_root,
)
from harness.core.errors import CheckpointError
from harness.core.fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    pretrain_config_hash,
)
from harness.core.tracking import ScalarLogger, progress
from harness.core.training import (
    GradAccumulation,
    ResumableCheckpoint,
    autocast,
    autocast_dtype,
    clip_and_step,
    epoch_batches,
    epoch_order,
    lr_at,
    pick_device,
    scaled_lr,
    set_lr,
    split_batch,
    steps_per_epoch,
)
from pretrain.model import MIMModel, create_model
from pretrain.viz import render_recon_grid, render_series

CHECKPOINT = "checkpoint.pth"
ENCODER = "encoder.pth"
SUMMARY = "summary.json"
TARGET_STATS = "target_stats.png"


@dataclass
class PretrainResult:
    """Where a finished pretraining put its outputs."""

    out_dir: Path
    encoder_path: Path
    recon_path: Path | None
    final_loss: float
    steps: int
    wall_s: float


def param_groups(model: MIMModel, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases / norms / embeddings / tokens without decay (the
    names the model's parts report, :meth:`MIMModel.no_weight_decay`)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each rank's share of the global batch; it must divide evenly.

    Equal slices make DDP's gradient average over ranks equal the gradient of the mean loss over
    the global batch, so a run on ``world_size`` processes follows the single-process run.

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``.
    """
    if global_batch % world_size != 0:
        lo = global_batch // world_size * world_size
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) is not divisible by the "
            f"{world_size} processes of this distributed run: set train.batch_size to a multiple "
            f"of {world_size} (e.g. {max(lo, world_size)} or {lo + world_size}) or change "
            "--nproc-per-node / --nnodes"
        )
    return global_batch // world_size


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank > 0``'s global RNG streams (rank 0 keeps the run's own)."""
    return (seed * 1_000_033 + rank * 7_777_777 + step) % (2**31 - 1)


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        "python": _from_py_state(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(_to_py_state(state["python"]))


def _mask_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 9_999_991 + step) % (2**63 - 1))


def _image_sampler(ds: SeededDataset, seed: int, device: torch.device):
    """``n -> [n, 3, H, W]``: the first ``n`` readable training images of a seeded order
    (epoch-0 augmentation), cycling when the split is smaller; what tokenizers fit on."""

    def sample(n: int) -> torch.Tensor:
        ds.set_epoch(0)
        order = epoch_order(len(ds), seed, -1)
        return torch.stack(_readable(ds, order, n)).to(device)

    return sample


def _readable(ds: Any, order: list[int], n: int) -> list[torch.Tensor]:
    """The images of the first ``n`` readable samples of ``ds`` in ``order`` (cycling).

    Raises:
        DatasetError: No sample of ``order`` is readable.
    """
    picked: list[torch.Tensor] = []
    i = 0
    while len(picked) < n:
        if i == len(order) and not picked:
            raise all_unreadable_error(getattr(ds, "base", ds))  # unwrap a SeededDataset
        item = ds[order[i % len(order)]]
        if item is not None:  # None: an unreadable file (skipped)
            picked.append(item[0])
        i += 1
    return picked


def _check_batch_readable(tally: SkipTally, world: int, step: int) -> None:
    """A local batch whose images are all unreadable: fine for one process (the step makes no
    update) when some image of the split is readable; otherwise a clear error.

    Raises:
        DatasetError: No image of the split decodes, or a data-parallel rank has nothing to
            forward (its gradient all-reduce would wait for ever).
    """
    tally.check_readable()
    if world > 1:
        raise DatasetError(
            f"step {step}: every image of this rank's batch is unreadable, which data-parallel "
            "training cannot skip; remove the unreadable files (named above) or raise "
            "train.batch_size"
        )


def _skipped_files(prior: set[str], tally: SkipTally) -> list[str]:
    """Every rank's unreadable training files met so far (a collective under torchrun)."""
    mine = sorted(prior | set(tally.paths()))
    return sorted(set().union(*map(set, distributed.all_gather_object(mine))))


@dataclass
class _Run:
    """One pretraining between :func:`_setup` and :func:`_finish`: what the steps read and
    change (the step count, the loss history, the unreadable files met)."""

    cfg: PretrainConfig
    out: Path
    log: Callable[[str], Any]
    ckpt: ResumableCheckpoint
    rank: int
    world: int
    local_batch: int
    device: torch.device
    amp_dtype: torch.dtype | None
    root: Path
    train_ds: SeededDataset
    skips: SkipTally
    steps_per_epoch: int
    total_steps: int
    warmup_steps: float
    peak_lr: float
    model: MIMModel
    opt: torch.optim.Optimizer
    net: torch.nn.Module
    accum: GradAccumulation
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_before: set[str] = field(default_factory=set)  # met by earlier sessions of this run
    last_loss: float = float("nan")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    log: Callable[[str], Any] = print,
    accum_steps: int = 1,
) -> PretrainResult:
    """Run (or resume) one pretraining.

    Args:
        cfg: The resolved pretraining config.
        out_dir: Stage directory; holds the resolved config, checkpoint, log, encoder and picture.
        resume: Continue from ``out_dir/checkpoint.pth`` when it exists (else start over).
        log: Where progress lines go.
        accum_steps: Micro-batches per step of each process's batch (gradient accumulation, for
            a batch that does not fit in memory at once; not a config key yet, so it is not in
            the config hash: the gradient is the same up to float rounding).

    Raises:
        CheckpointError: ``resume`` and the checkpoint was written by another config.
    """
    out = Path(out_dir)
    # data parallel when launched by torchrun (harness.core.distributed.init_from_env was called)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    local_batch = local_batch_size(cfg.train.batch_size, world)
    if rank != 0:
        log = _silent  # rank 0 reports for everyone
    # every refusal (a checkpoint of another config, missing data, a bad size) comes before the
    # first write, so a refused run leaves the directory as it was
    ckpt = ResumableCheckpoint(
        out / CHECKPOINT, pretrain_config_hash(to_plain(cfg)),
        fix="pass --overwrite to start over, use another output directory, or delete it",
    )  # fmt: skip
    ck = _read_checkpoint(ckpt, resume, rank, world)
    run = _setup(cfg, out, ckpt, log, rank, world, local_batch, accum_steps, fresh=ck is None)
    if ck is not None:
        _restore(run, ck)
    elif not run.is_main:
        # rank 0 keeps the single-process RNG stream; the others get their own, so in-forward
        # randomness (drop path, token corruption) is not repeated across ranks
        torch.manual_seed(_rank_seed(cfg.seed, rank))
        random.seed(_rank_seed(cfg.seed, rank))
    _wrap_data_parallel(run)
    t = cfg.train
    log(
        f"[pretrain {cfg.name}] recipe={cfg.recipe.name} encoder={cfg.encoder.arch} "
        f"images={len(run.train_ds)} batch={t.batch_size} steps={run.total_steps} "
        f"lr={run.peak_lr:.3g} device={run.device}{' bf16' if run.amp_dtype else ' fp32'}"
        + (f" ranks={world} (batch {local_batch} each)" if world > 1 else "")
    )
    t0 = time.time()
    _train(run, t0)
    return _finish(run, time.time() - t0)


def _read_checkpoint(
    ckpt: ResumableCheckpoint, resume: bool, rank: int, world: int
) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a fresh run), read before anything is written.

    Raises:
        CheckpointError: The checkpoint was written by a different config, or a rank cannot see
            the file rank 0 resumes from.
    """
    resuming = resume and ckpt.exists()
    if world > 1:  # rank 0 decides; every rank must then see the same checkpoint file
        resuming = bool(distributed.broadcast_object(resuming))
        if resuming and not ckpt.exists():
            raise CheckpointError(
                f"rank {rank} cannot see {ckpt.path}, which rank 0 resumes from: the output "
                "directory must be on a filesystem shared by all nodes"
            )
    return ckpt.load() if resuming else None


def _setup(
    cfg: PretrainConfig,
    out: Path,
    ckpt: ResumableCheckpoint,
    log: Callable[[str], Any],
    rank: int,
    world: int,
    local_batch: int,
    accum_steps: int,
    fresh: bool,
) -> _Run:
    """Device, seeds, data, schedule, model and optimizer; writes ``config.yaml`` (rank 0) once
    nothing refused the run, and fits the recipe's target on a fresh run (``model.prepare``).

    Raises:
        DatasetError: The data is missing or unreadable.
        ConfigError: The train split holds less than one batch.
    """
    t = cfg.train
    device = pick_device(t.device)
    amp_dtype = autocast_dtype(t.precision, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    root = resolve_imagefolder_root(cfg.data)
    img_size = int(cfg.encoder.img_size)  # type: ignore[arg-type]
    # unreadable files are skipped, counted and named on the log (fatal with data.strict_data)
    # recipe.global_crops views of each image ([B, V, 3, H, W] batches for iBOT), else one
    crops = MultiView(pretrain_transform(img_size, t.crop_scale, t.hflip), cfg.recipe.global_crops)
    base_ds = imagefolder_checked(
        root, "train", crops, strict=cfg.data.strict_data, min_classes=1
    )
    train_ds = SeededDataset(base_ds, cfg.seed)
    spe = steps_per_epoch(len(train_ds), t.batch_size, "lower train.batch_size")
    total_steps = t.epochs * spe
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    model = create_model(cfg.encoder, cfg.recipe).to(device)
    model.set_run_length(total_steps)
    if rank == 0:  # nothing refused the run: it is this directory's config from now on
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if fresh:
        model.prepare(_image_sampler(train_ds, cfg.seed, device), log)
    peak_lr = scaled_lr(t.base_lr, t.batch_size, t.lr_base_batch)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=peak_lr, betas=t.betas)
    return _Run(
        cfg=cfg, out=out, log=log, ckpt=ckpt, rank=rank, world=world, local_batch=local_batch,
        device=device, amp_dtype=amp_dtype, root=root, train_ds=train_ds,
        skips=SkipTally(base_ds, "pretraining train split"), steps_per_epoch=spe,
        total_steps=total_steps, warmup_steps=t.warmup_epochs * spe, peak_lr=peak_lr,
        model=model, opt=opt, net=model, accum=GradAccumulation(accum_steps),
    )  # fmt: skip


def _restore(run: _Run, ck: dict[str, Any]) -> None:
    """Model, optimizer, step, history and RNG states from checkpoint ``ck``."""
    cfg, rank, world = run.cfg, run.rank, run.world
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    run.step = int(ck["step"])
    run.history = list(ck["history"])
    run.last_loss = run.history[-1]["loss"] if run.history else float("nan")
    run.skipped_before = set(ck.get("skipped_files", []))
    per_rank = ck.get("rng_ranks")
    if world > 1 and per_rank is not None and len(per_rank) == world:
        _set_rng_state(per_rank[rank], run.device)
    elif run.is_main:
        _set_rng_state(ck["rng"], run.device)
    else:  # a checkpoint from another world size: fresh, still seeded, streams for rank > 0
        torch.manual_seed(_rank_seed(cfg.seed, rank, run.step))
        random.seed(_rank_seed(cfg.seed, rank, run.step))
    if world > 1 and int(ck.get("world_size", 1)) != world:
        run.log(f"[pretrain {cfg.name}] checkpoint written by {ck.get('world_size', 1)} "
                f"process(es), resumed by {world}: the data order and masks continue exactly; the "
                "RNG streams of ranks > 0 (drop path, token corruption) are reseeded")  # fmt: skip
    run.log(f"[pretrain {cfg.name}] resumed at step {run.step}/{run.total_steps} from {run.ckpt.path}")


def _wrap_data_parallel(run: _Run) -> None:
    """Under torchrun, the model the steps call is wrapped in DistributedDataParallel."""
    if run.world == 1:
        return
    # some parameters never get a gradient (MAE's encoder mask token); DDP must look for
    # them each step (static_graph=True gave wrong cls-token gradients here: 0.2 off)
    ids = [torch.cuda.current_device()] if run.device.type == "cuda" else None
    run.net = DistributedDataParallel(run.model, device_ids=ids, find_unused_parameters=True)


def _save_checkpoint(run: _Run) -> None:
    """The resumable state (a collective under torchrun: every rank calls it, rank 0 writes)."""
    ck = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "step": run.step,
        "history": run.history,
        "encoder_config": run.cfg.encoder.model_dump(mode="json"),  # what import builds
        "rng": _rng_state(run.device),
        "skipped_files": _skipped_files(run.skipped_before, run.skips),  # a collective too
    }
    if run.world > 1:
        ck["rng_ranks"] = distributed.all_gather_object(_rng_state(run.device))
        ck["world_size"] = run.world
    if run.is_main:
        run.ckpt.save(ck)


def _train(run: _Run, t0: float) -> None:
    """Steps until ``total_steps``: each epoch's seeded order from the step reached on."""
    cfg, t = run.cfg, run.cfg.train
    step_at_start = run.step
    scalars = ScalarLogger(run.out, run_name=run.out.name, enabled=run.is_main)
    bar = (
        progress(total=run.total_steps, initial=run.step, desc=f"pretrain {cfg.name}", unit="step")
        if run.is_main
        else None
    )
    run.net.train()
    try:
        while run.step < run.total_steps:
            epoch, batch_idx = divmod(run.step, run.steps_per_epoch)
            run.train_ds.set_epoch(epoch)
            # this rank's slice of each global batch (the whole batch for a single process)
            batches = epoch_batches(
                len(run.train_ds), cfg.seed, epoch, t.batch_size, batch_idx, micro=run.local_batch
            )[run.rank :: run.world]
            loader = DataLoader(
                run.train_ds, batch_sampler=batches, num_workers=cfg.data.num_workers,
                pin_memory=run.device.type == "cuda", persistent_workers=False,
                collate_fn=collate_skipping,
            )  # fmt: skip
            for j, (imgs, _, keep) in enumerate(loader):
                run.skips.add(batches[j], keep)
                run.skips.report(run.log)  # names each unreadable file once
                lr = lr_at(run.step, run.total_steps, run.warmup_steps, run.peak_lr, t.min_lr)
                set_lr(run.opt, lr)
                mask = _local_mask(run, keep)  # [b, L]
                if imgs.shape[0] == 0:  # every image unreadable: this step makes no update
                    _check_batch_readable(run.skips, run.world, run.step)
                    run.step += 1
                    run.log(f"[pretrain {cfg.name}] step {run.step}: no readable image in the "
                            "batch, no update")  # fmt: skip
                else:
                    _train_step(run, imgs, mask, lr)
                    scalars.scalars({"pretrain/loss": run.last_loss, "pretrain/lr": lr}, run.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{run.last_loss:.4f}", refresh=False)
                    if run.step % t.log_every_steps == 0 or run.step == run.total_steps:
                        _log_progress(run, epoch, lr, step_at_start, t0)
                if bar is not None:
                    bar.update(1)
                if run.step % t.ckpt_every_steps == 0 or run.step == run.total_steps:
                    _save_checkpoint(run)
                if run.step >= run.total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        scalars.close()


def _local_mask(run: _Run, keep: torch.Tensor) -> torch.Tensor:
    """This step's masks of this rank's readable images ``[b, L]``: the masks of the whole
    global batch, then this rank's rows (the union over ranks is the single-process mask), less
    the rows of unreadable images (``keep``)."""
    lo = run.rank * run.local_batch
    mask = run.model.masker(run.cfg.train.batch_size, generator=_mask_generator(run.cfg.seed, run.step))
    return mask[lo : lo + run.local_batch][keep]


def _train_step(run: _Run, imgs: torch.Tensor, mask: torch.Tensor, lr: float) -> None:
    """One optimizer step on this rank's readable images ``[b, 3, H, W]`` and their masks
    ``[b, L]``, accumulated over up to ``run.accum.k`` micro-batches (each loss weighted by its
    share of the ``b`` images, so the step's gradient is that of the mean loss; under DDP the
    gradients are all-reduced on the last micro-batch only).

    Raises:
        FloatingPointError: The loss is not finite (the same verdict on every rank).
    """
    t = run.cfg.train
    imgs = imgs.to(run.device, non_blocking=True)
    mask = mask.to(run.device, non_blocking=True)
    b = imgs.shape[0]
    parts = split_batch(b, run.accum.k)
    run.opt.zero_grad(set_to_none=True)
    local = torch.zeros((), device=run.device)
    stats: dict[str, float] = {}
    for j, part in enumerate(parts):
        with _sync_unless(run.net, last=j == len(parts) - 1):
            with autocast(run.device, run.amp_dtype):
                out = run.net(imgs[part], mask[part])
            loss, stats = out.loss, out.stats  # the statistics of the last micro-batch
            if len(parts) > 1:  # this micro-batch's share of the mean over the b images
                loss = loss * ((part.stop - part.start) / b)
            loss.backward()
        if len(parts) > 1:
            local = local + loss.detach().float()
    loss_value = distributed.all_reduce_mean(local if len(parts) > 1 else loss.detach())
    if not math.isfinite(loss_value):  # the same verdict on every rank, before the update
        raise FloatingPointError(
            f"loss is {loss_value} at step {run.step}; the last good checkpoint is "
            f"{run.ckpt.path if run.ckpt.exists() else '(none yet)'}. Lower train.base_lr or "
            "set train.clip_grad"
        )
    clip_and_step(run.opt, run.model.parameters(), t.clip_grad)
    run.step += 1
    run.model.after_step(run.step)
    run.last_loss = loss_value
    run.history.append({"step": run.step, "loss": loss_value, "lr": lr, **stats})
    _check_collapse(run, stats)


def _check_collapse(run: _Run, stats: dict[str, float]) -> None:
    """Log a step whose latent target's std fell below ``recipe.teacher.collapse_std`` (every
    such step on the log lines' cadence, and the first one); the summary counts them."""
    teacher = run.cfg.recipe.teacher
    std = stats.get("target_std")
    if teacher is None or std is None or not std < teacher.collapse_std:
        return
    if _collapsed_steps(run.history, teacher.collapse_std) == 1 or (
        run.step % run.cfg.train.log_every_steps == 0
    ):
        run.log(f"[pretrain {run.cfg.name}] step {run.step}: target std {std:.3g} is below "
                f"recipe.teacher.collapse_std {teacher.collapse_std:g}: the targets are "
                "collapsing (every patch gets the same target)")  # fmt: skip


def _collapsed_steps(history: list[dict[str, float]], threshold: float) -> int:
    """Steps of ``history`` whose target std is below ``threshold``."""
    return sum(1 for h in history if h.get("target_std", math.inf) < threshold)


def _sync_unless(net: torch.nn.Module, last: bool) -> Any:
    """DDP's ``no_sync`` for every micro-batch but the last of a step (a no-op context for a
    single process and for the last micro-batch, whose backward all-reduces the sum)."""
    if last or not isinstance(net, DistributedDataParallel):
        return contextlib.nullcontext()
    return net.no_sync()


def _log_progress(run: _Run, epoch: int, lr: float, step_at_start: int, t0: float) -> None:
    """The progress line: step, epoch, loss, lr, throughput and the time left."""
    batch = run.cfg.train.batch_size
    el = time.time() - t0
    rate = (run.step - step_at_start) * batch / max(el, 1e-9)
    eta = (run.total_steps - run.step) * batch / max(rate, 1e-9)
    run.log(
        f"[pretrain {run.cfg.name}] step {run.step}/{run.total_steps} epoch {epoch} "
        f"loss {run.last_loss:.4f} lr {lr:.3g} {rate:.1f} img/s eta {eta:.0f}s"
    )


def _finish(run: _Run, wall: float) -> PretrainResult:
    """The encoder file, the reconstruction picture, the loss curve and the summary (rank 0)."""
    cfg, out = run.cfg, run.out
    recon = out / "recon.png" if cfg.train.num_recon_images > 0 else None
    skipped = _skipped_files(run.skipped_before, run.skips)  # a collective: before the rank-0 block
    if skipped:
        run.log(f"[pretrain {cfg.name}] {len(skipped)} unreadable training image(s) skipped "
                f"(listed in {SUMMARY})")  # fmt: skip
    if run.is_main:  # the other ranks wait at the barrier below until the outputs exist
        chash = run.ckpt.config_hash
        meta = {"recipe": cfg.recipe.model_dump(mode="json"), "config_hash": chash, "steps": run.step}
        exported, encoder = run.model.exported_encoder()  # the student, or an EMA teacher
        encoder.save_timm(out / ENCODER, meta={**meta, "exported": exported})  # type: ignore[operator]
        if recon is not None:
            recon = save_reconstruction_grid(run.model, run.root, cfg, recon, run.device, run.log)
        atomic_write_text(out / "loss.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
        atomic_write_json(
            out / SUMMARY,
            {
                "status": "ok", "final_loss": run.last_loss, "steps": run.step, "wall_s": wall,
                "config_hash": chash, "encoder": ENCODER, "recon": recon.name if recon else None,
                "skipped_images": {"train": len(skipped)}, "skipped_files": skipped,
                **({"world_size": run.world} if run.world > 1 else {}),
                **_teacher_summary(run, exported),
            },
        )  # fmt: skip
    distributed.barrier()
    return PretrainResult(out, out / ENCODER, recon, run.last_loss, run.step, wall)


def _teacher_summary(run: _Run, exported: str) -> dict[str, Any]:
    """For a recipe with an EMA teacher: which encoder was exported, the collapse count and the
    plot of the target statistics per step (``target_stats.png``)."""
    teacher = run.cfg.recipe.teacher
    if teacher is None:
        return {}
    plot = run.out / TARGET_STATS
    series = {k: [h.get(k, math.nan) for h in run.history] for k in ("target_std", "cosine")}
    atomic_write_bytes(plot, render_series([h["step"] for h in run.history], series))
    stds = [v for v in series["target_std"] if math.isfinite(v)]
    return {
        "exported_encoder": exported,
        "target_stats": TARGET_STATS,
        "final_target_std": stds[-1] if stds else None,
        "collapse": {
            "threshold": teacher.collapse_std,
            "steps": _collapsed_steps(run.history, teacher.collapse_std),
        },
    }


def _silent(msg: str) -> None:
    """The logger of ranks > 0."""


def _from_py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _to_py_state(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


@torch.no_grad()
def save_reconstruction_grid(
    model: MIMModel,
    root: Path,
    cfg: PretrainConfig,
    path: Path,
    device: torch.device,
    log: Any = print,
) -> Path | None:
    """Rows from :meth:`MIMModel.visualize`: original, masked input, then the recipe's rows.

    Images come evenly spaced from the val split, unreadable files skipped; without a readable
    val image there is no picture (None), the run's outputs are kept.
    """

    img_size = int(cfg.encoder.img_size)  # type: ignore[arg-type]
    ds = imagefolder_checked(
        root, "val", eval_transform(img_size, cfg.data.eval_crop_pct), min_classes=1
    )
    k = min(cfg.train.num_recon_images, len(ds))
    step = max(1, len(ds) // k)
    spaced = [i * step for i in range(k)]
    try:  # the spaced images, then others in place of unreadable ones
        chosen = set(spaced)
        rest = [i for i in range(len(ds)) if i not in chosen]
        picked = _readable(ds, spaced + rest, k)
    except DatasetError as exc:
        log(f"[pretrain {cfg.name}] no reconstruction picture: {exc}")
        return None
    imgs = torch.stack(picked).to(device)
    mask = model.masker(k, generator=_mask_generator(cfg.seed, -1)).to(device)
    was_training = model.training
    model.eval()
    out = model(imgs, mask)
    model.train(was_training)
    # (name, [k, 3, H, W] in [0, 1]) per row, drawn with the row's label beside it
    rows = [(name, img.float().clamp(0, 1).cpu()) for name, img in model.visualize(imgs, out)]
    im = render_recon_grid(rows, scale=max(1, 96 // img_size))
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
