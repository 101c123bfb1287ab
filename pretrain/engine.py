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
* The loop reads as MAE's: :func:`pretrain` is setup (:func:`_setup`), the wrapping
  (:func:`_wrap`), restore (:func:`_restore`), the steps (:func:`_train`, :func:`_train_step`)
  and :func:`_finish`.
* Compute and memory (``train.*``, :mod:`harness.core.parallel`): ``accum_steps`` accumulates
  gradients over micro-batches of each step (the lr schedule counts optimizer steps);
  ``activation_checkpointing`` recomputes each encoder block in the backward pass; ``fsdp``
  shards the model over the ranks with one ``fully_shard`` unit per encoder block instead of DDP
  (checkpoints hold full state dicts, so resume and export read them as any other);
  ``compile`` runs the model through ``torch.compile``, falling back to eager with one warning
  when compilation fails. The summary says what ran (``compute``).
* A non-finite loss (the mean over ranks, so every rank takes the same branch) follows
  ``train.nonfinite``: ``stop`` raises naming the step; ``skip`` makes no update that step and
  counts it; ``restore`` reloads the last checkpoint (a fresh run writes one at step 0) and
  multiplies the lr by ``nonfinite_lr_factor``; more than ``nonfinite_max_events`` events in a
  row stop the run. Every event is logged and listed in the summary (``nonfinite``) and the
  checkpoint.
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
  targets: the masks only, plus ``target_stats.png``, the target std over the batch, its std
  within each image (spatial collapse) and the student-teacher cosine per step; steps whose target std falls below ``recipe.teacher.collapse_std`` are
  logged and counted in the summary, and a run whose targets spread within images less than
  half as much as over the batch is logged and flagged as a spatial collapse).
"""

from __future__ import annotations

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

from harness.core import distributed, parallel
from harness.core.config import ConfigError, PretrainConfig, dump_config, to_plain
from harness.core.data.datasets import (
    CheckedImageFolder,
    Crops,
    DatasetError,
    MultiView,
    SeededDataset,
    SkipTally,
    all_unreadable_error,
    eval_transform,
    imagefolder_checked,
    photometric_ops,
    pretrain_transform,
    resolve_imagefolder_root,
)
from harness.core.data.fastdecode import fast_pretrain_transform, to_device_normalized
from harness.core.data.shards import ShardStream
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
    NonfinitePolicy,
    ResumableCheckpoint,
    autocast,
    autocast_dtype,
    clip_and_step,
    epoch_order,
    lr_at,
    pick_device,
    scaled_lr,
    set_lr,
    split_batch,
)
from pretrain.avgdist import encoder_avgdist
from pretrain.feed import Feed, IndexFeed, StreamFeed
from pretrain.inits import encoder_definition
from pretrain.model import MIMModel, create_model
from pretrain.teacher import SPATIAL_COLLAPSE_RATIO, teacher_mix, within_to_batch_ratio
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


def local_batch_size(global_batch: int, world_size: int, key: str = "train.batch_size") -> int:
    """Each rank's share of the global batch; it must divide evenly.

    Equal slices make DDP's gradient average over ranks equal the gradient of the mean loss over
    the global batch, so a run on ``world_size`` processes follows the single-process run.

    Args:
        key: The config key the error names (fine-tuning: its task's ``batch_size``).

    Raises:
        ConfigError: ``global_batch`` is not a multiple of ``world_size``.
    """
    if global_batch % world_size != 0:
        lo = global_batch // world_size * world_size
        raise ConfigError(
            f"{key}={global_batch} (the global batch) is not divisible by the "
            f"{world_size} processes of this distributed run: set {key} to a multiple "
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
        return to_device_normalized(torch.stack(_readable(ds, order, n)), device)

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
    feed: Feed  # the steps' batches: the seeded global order, or the shard stream
    skips: SkipTally
    steps_per_epoch: int
    total_steps: int
    warmup_steps: float
    peak_lr: float
    model: MIMModel
    opt: torch.optim.Optimizer
    net: torch.nn.Module  # what the steps call: the model, wrapped (DDP, compile) or not
    accum: GradAccumulation
    nonfinite: NonfinitePolicy  # train.nonfinite's
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_before: set[str] = field(default_factory=set)  # met by earlier sessions of this run
    last_loss: float = float("nan")
    ddp: DistributedDataParallel | None = None
    fsdp: bool = False  # the model is sharded (fully_shard)
    eager: torch.nn.Module | None = None  # run.net before torch.compile
    compile_error: str | None = None  # why compilation failed (then run.net is eager)
    restart: bool = False  # the state was restored: the loop goes on from run.step

    @property
    def compiled(self) -> bool:
        """Whether the steps run the compiled model."""
        return self.eager is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    log: Callable[[str], Any] = print,
) -> PretrainResult:
    """Run (or resume) one pretraining.

    Args:
        cfg: The resolved pretraining config.
        out_dir: Stage directory; holds the resolved config, checkpoint, log, encoder and picture.
        resume: Continue from ``out_dir/checkpoint.pth`` when it exists (else start over).
        log: Where progress lines go.

    Raises:
        CheckpointError: ``resume`` and the checkpoint was written by another config.
        FloatingPointError: A non-finite loss that ``train.nonfinite`` does not absorb.
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
    run = _setup(cfg, out, ckpt, log, rank, world, local_batch, fresh=ck is None)
    _wrap(run)
    if ck is not None:
        _restore(run, ck)
    _write_config(run)  # nothing refused the run: it is this directory's config from now on
    if ck is None:
        if not run.is_main:
            # rank 0 keeps the single-process RNG stream; the others get their own, so in-forward
            # randomness (drop path, token corruption) is not repeated across ranks
            torch.manual_seed(_rank_seed(cfg.seed, rank))
            random.seed(_rank_seed(cfg.seed, rank))
        if cfg.train.nonfinite == "restore":  # what a non-finite loss before any checkpoint restores
            _save_checkpoint(run)
    t = cfg.train
    log(
        f"[pretrain {cfg.name}] recipe={cfg.recipe.name} encoder={cfg.encoder.arch} "
        f"images={len(run.train_ds)} batch={t.batch_size} steps={run.total_steps} "
        f"lr={run.peak_lr:.3g} device={run.device}{' bf16' if run.amp_dtype else ' fp32'}"
        + (f" ranks={world} (batch {local_batch} each)" if world > 1 else "")
        + _compute_note(run)
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
    # data.fast_decode: JPEGs decoded at reduced size, uint8 batches normalised on the device
    # recipe.augment: the photometric ops of each kind of crop (the first global crop, the
    # others, the local ones: DINO / iBOT give each its own); fast_decode with them is refused
    # in config
    r = cfg.recipe
    if cfg.data.fast_decode:
        tf = fast_pretrain_transform(img_size, t.crop_scale, t.hflip)
        rest_tf = None
    else:
        tf = pretrain_transform(img_size, t.crop_scale, t.hflip, photometric_ops(r.augment, "first"))
        rest_tf = pretrain_transform(img_size, t.crop_scale, t.hflip, photometric_ops(r.augment, "other"))
    # recipe.global_crops views of each image ([B, V, 3, H, W] batches for iBOT), else one (the
    # transform itself: a LazyDecode crop stays one; fast_decode with views is refused in config);
    # recipe.local_crops smaller views as well (iBOT's multi-crop: Crops batches)
    views, n_local = r.global_crops, r.local_crops
    local_tf = (pretrain_transform(r.local_crop_size, r.local_crop_scale, t.hflip,
                                   photometric_ops(r.augment, "local")) if n_local else None)  # fmt: skip
    crops = tf if views == 1 and not n_local else MultiView(tf, views, local_tf, n_local, rest_tf)
    base_ds = imagefolder_checked(
        root, "train", crops, strict=cfg.data.strict_data, min_classes=1
    )
    train_ds = SeededDataset(base_ds, cfg.seed)
    feed = _feed(cfg, root, base_ds, train_ds, local_batch, rank, world, device)
    spe = feed.steps_per_epoch
    total_steps = t.epochs * spe
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)

    model = create_model(cfg.encoder, cfg.recipe).to(device)
    model.set_run_length(total_steps)
    if fresh:
        model.prepare(_image_sampler(train_ds, cfg.seed, device), log)
    peak_lr = scaled_lr(t.base_lr, t.batch_size, t.lr_base_batch)
    return _Run(
        cfg=cfg, out=out, log=log, ckpt=ckpt, rank=rank, world=world, local_batch=local_batch,
        device=device, amp_dtype=amp_dtype, root=root, train_ds=train_ds, feed=feed,
        skips=SkipTally(base_ds, "pretraining train split"), steps_per_epoch=spe,
        total_steps=total_steps, warmup_steps=t.warmup_epochs * spe, peak_lr=peak_lr,
        model=model, opt=_optimizer(model, cfg, peak_lr), net=model,
        accum=GradAccumulation(t.accum_steps),
        nonfinite=NonfinitePolicy(t.nonfinite, t.nonfinite_lr_factor, t.nonfinite_max_events,
                                  keys="train."),
    )  # fmt: skip


def _feed(cfg: PretrainConfig, root: Path, base_ds: CheckedImageFolder, train_ds: SeededDataset,
          local_batch: int, rank: int, world: int, device: torch.device) -> Feed:  # fmt: skip
    """The run's loader: the shard stream (``data.stream``; ``base_ds``, the same shards by
    random access, names its samples) or the seeded global order over ``train_ds``.

    Raises:
        DatasetError: The stream has fewer shards than ranks x loader workers.
        ConfigError: An epoch holds less than one batch.
    """
    d = cfg.data
    if not d.stream:
        return IndexFeed(train_ds, cfg.train.batch_size, local_batch, rank, world, d.num_workers,
                         device)  # fmt: skip
    stream = ShardStream(root, "train", base_ds.transform, cfg.seed, local_batch, d.num_workers,
                         rank, world, buffer=d.shuffle_buffer, strict=d.strict_data)  # fmt: skip
    return StreamFeed(stream, base_ds, d.num_workers, device)


def _avgdist(run: _Run) -> dict[str, Any] | None:
    """The AvgDist of the run's masking for the summary; None for a causal masker (iGPT's
    raster order predicts every token: no visible pixel, the distance is undefined)."""
    if run.model.causal:
        return None
    return encoder_avgdist(run.cfg.recipe.masking, run.cfg.encoder).to_dict()


def _write_config(run: _Run) -> None:
    """``config.yaml`` of the output directory (rank 0), once nothing refused the run."""
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "config.yaml", dump_config(run.cfg))


def _optimizer(model: MIMModel, cfg: PretrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (built again after ``fully_shard`` replaced the
    parameters)."""
    t = cfg.train
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=peak_lr, betas=t.betas)


def _restore(run: _Run, ck: dict[str, Any]) -> None:
    """Resume from checkpoint ``ck``: the training state (:func:`_load_training_state`), the
    unreadable files met, the lr scale and the non-finite events so far."""
    cfg, world = run.cfg, run.world
    run.feed.load_state_dict(ck)  # a stream refuses other numbers of ranks or workers
    _load_training_state(run, ck)
    run.skipped_before = set(ck.get("skipped_files", []))
    run.nonfinite.load_state(ck)
    if world > 1 and int(ck.get("world_size", 1)) != world:
        run.log(f"[pretrain {cfg.name}] checkpoint written by {ck.get('world_size', 1)} "
                f"process(es), resumed by {world}: the data order and masks continue exactly; the "
                "RNG streams of ranks > 0 (drop path, token corruption) are reseeded")  # fmt: skip
    run.log(f"[pretrain {cfg.name}] resumed at step {run.step}/{run.total_steps} from {run.ckpt.path}")


def _load_training_state(run: _Run, ck: dict[str, Any]) -> None:
    """Model, optimizer, step, history and RNG states from checkpoint ``ck`` (full state dicts,
    loaded into a sharded model as into any other)."""
    cfg, rank, world = run.cfg, run.rank, run.world
    parallel.load_model_state(run.model, ck["model"])
    run.model.check_restored(str(run.ckpt.path))  # a fitted codebook the model reads, if any
    parallel.load_optimizer_state(run.model, run.opt, ck["optimizer"])
    run.step = int(ck["step"])
    run.history = list(ck["history"])
    run.last_loss = run.history[-1]["loss"] if run.history else float("nan")
    per_rank = ck.get("rng_ranks")
    if world > 1 and per_rank is not None and len(per_rank) == world:
        _set_rng_state(per_rank[rank], run.device)
    elif run.is_main:
        _set_rng_state(ck["rng"], run.device)
    else:  # a checkpoint from another world size: fresh, still seeded, streams for rank > 0
        torch.manual_seed(_rank_seed(cfg.seed, rank, run.step))
        random.seed(_rank_seed(cfg.seed, rank, run.step))


def _wrap(run: _Run) -> None:
    """What the steps call: the model with activation checkpointing per encoder block (when
    asked), then sharded (FSDP) or wrapped in DDP under torchrun, then compiled (when asked)."""
    t = run.cfg.train
    blocks = run.model.encoder.residual_blocks()
    if t.activation_checkpointing:
        parallel.checkpoint_blocks(blocks)
    if t.fsdp and run.world > 1:
        _shard(run, blocks)
    elif run.world > 1:
        _wrap_data_parallel(run)
    if t.compile:
        run.eager = run.net
        run.net = parallel.compile_module(run.net)


def _shard(run: _Run, blocks: list[torch.nn.Module]) -> None:
    """FSDP: one unit per encoder block, one for the rest; the optimizer is built again over the
    sharded parameters (each rank holds its shard of the AdamW moments)."""
    parallel.shard_blocks(run.model, blocks, run.device)
    run.opt = _optimizer(run.model, run.cfg, run.peak_lr)
    run.fsdp = True


def _wrap_data_parallel(run: _Run) -> None:
    """Under torchrun, the model the steps call is wrapped in DistributedDataParallel."""
    # some parameters never get a gradient (MAE's encoder mask token); DDP must look for
    # them each step (static_graph=True gave wrong cls-token gradients here: 0.2 off)
    ids = [torch.cuda.current_device()] if run.device.type == "cuda" else None
    run.ddp = DistributedDataParallel(run.model, device_ids=ids, find_unused_parameters=True)
    run.net = run.ddp


def _compute_note(run: _Run) -> str:
    """The start line's note of the compute settings that are not the defaults."""
    t = run.cfg.train
    notes = [f"accum={t.accum_steps}"] if t.accum_steps > 1 else []
    notes += ["fsdp"] if run.fsdp else []
    if t.fsdp and not run.fsdp:
        notes.append("fsdp off (one process: nothing to shard)")
    notes += ["activation-checkpointing"] if t.activation_checkpointing else []
    notes += ["compile"] if t.compile else []
    notes += [f"nonfinite={t.nonfinite}"] if t.nonfinite != "stop" else []
    return (" " + " ".join(notes)) if notes else ""


def _save_checkpoint(run: _Run) -> None:
    """The resumable state (a collective under torchrun: every rank calls it, rank 0 writes)."""
    ck = {
        "model": parallel.model_state(run.model),  # full tensors, under FSDP too
        "optimizer": parallel.optimizer_state(run.model, run.opt),
        "step": run.step,
        "history": run.history,
        "encoder_config": run.cfg.encoder.model_dump(mode="json"),  # what import builds
        "rng": _rng_state(run.device),
        "skipped_files": _skipped_files(run.skipped_before, run.skips),  # a collective too
        **run.nonfinite.state(),
        **run.feed.state_dict(run.step),
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
            # this rank's batches (its slice of each global batch, or its stream) from batch_idx
            for imgs, keep, indices in run.feed.epoch(epoch, batch_idx):
                run.skips.add(indices, keep)
                run.skips.report(run.log)  # names each unreadable file once
                lr = run.nonfinite.lr_scale * lr_at(
                    run.step, run.total_steps, run.warmup_steps, run.peak_lr, t.min_lr
                )
                set_lr(run.opt, lr)
                mask = _local_mask(run, keep)  # [b, L]
                # (an empty batch is a tensor; Crops hold at least one image)
                if not isinstance(imgs, Crops) and imgs.shape[0] == 0:  # every image unreadable: this step makes no update
                    _check_batch_readable(run.skips, run.world, run.step)
                    run.step += 1
                    run.log(f"[pretrain {cfg.name}] step {run.step}: no readable image in the "
                            "batch, no update")  # fmt: skip
                else:
                    _train_step(run, imgs, mask, lr)
                    if run.restart:  # a restored checkpoint: the epoch's loader from run.step
                        run.restart = False
                        _rewind_bar(bar, run.step)
                        break
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


def _rewind_bar(bar: Any, step: int) -> None:
    """Put the progress bar back at ``step`` (after a restored checkpoint)."""
    if bar is not None:
        bar.n = step
        bar.refresh()


def _local_mask(run: _Run, keep: torch.Tensor) -> torch.Tensor:
    """This step's masks of this rank's readable images ``[b, L]``: the masks of the whole
    global batch, then this rank's rows (the union over ranks is the single-process mask), less
    the rows of unreadable images (``keep``)."""
    lo = run.rank * run.local_batch
    mask = run.model.masker(run.cfg.train.batch_size, generator=_mask_generator(run.cfg.seed, run.step))
    return mask[lo : lo + run.local_batch][keep]


def _train_step(run: _Run, imgs: torch.Tensor | Crops, mask: torch.Tensor, lr: float) -> None:
    """One optimizer step on this rank's readable images ``[b, 3, H, W]`` (or their views,
    and with local crops :class:`Crops`) and their masks ``[b, L]`` (:func:`_forward_backward`);
    a non-finite loss goes to :func:`_on_nonfinite` instead of the update.

    Raises:
        FloatingPointError: The loss is not finite and ``train.nonfinite`` gives up (the same
            verdict on every rank).
    """
    views, local = imgs if isinstance(imgs, Crops) else (imgs, None)
    views = to_device_normalized(views, run.device)  # uint8 from data.fast_decode: normalised here
    if local is not None:
        local = local.to(run.device, non_blocking=True)
    mask = mask.to(run.device, non_blocking=True)
    run.opt.zero_grad(set_to_none=True)
    loss_value, stats = _forward_backward(run, views, mask, local)
    if not math.isfinite(loss_value):  # the same verdict on every rank, before the update
        _on_nonfinite(run, loss_value, lr)
        return
    clip_and_step(run.opt, run.model.parameters(), run.cfg.train.clip_grad)
    run.step += 1
    run.model.after_step(run.step)
    run.last_loss = loss_value
    run.history.append({"step": run.step, "loss": loss_value, "lr": lr, **stats})
    _check_collapse(run, stats)
    run.nonfinite.stepped(run.step)


def _forward_backward(
    run: _Run, imgs: torch.Tensor, mask: torch.Tensor, local: torch.Tensor | None
) -> tuple[float, dict[str, float]]:
    """The step's gradients, its loss (the mean over ranks) and the target's statistics of its
    last micro-batch (:attr:`pretrain.model.MIMOutput.stats`). A compiled model that fails
    (compilation happens at the first call, and again on a new input shape) is dropped for the
    eager one with one warning, and the step is redone eagerly from the same RNG state."""
    if not run.compiled:
        local_loss, stats = _accumulate(run, imgs, mask, local)
        return distributed.all_reduce_mean(local_loss), stats
    rng = _rng_state(run.device)
    try:
        local_loss, stats = _accumulate(run, imgs, mask, local)
    except Exception as exc:  # noqa: BLE001  (a compiler's failure has no one type)
        _uncompile(run, exc)
        _set_rng_state(rng, run.device)
        run.opt.zero_grad(set_to_none=True)
        local_loss, stats = _accumulate(run, imgs, mask, local)
    return distributed.all_reduce_mean(local_loss), stats


def _uncompile(run: _Run, exc: BaseException) -> None:
    """Go on with the eager model; the warning names the error (the summary keeps it)."""
    assert run.eager is not None
    run.net, run.eager = run.eager, None
    run.compile_error = parallel.compile_failure_message(exc)
    run.log(f"[pretrain {run.cfg.name}] WARNING: {run.compile_error}")


def _accumulate(
    run: _Run, imgs: torch.Tensor, mask: torch.Tensor, local: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward of this rank's batch, accumulated over up to ``run.accum.k``
    micro-batches (each loss weighted by its share of the ``b`` images, so the step's gradient
    is that of the mean loss; under DDP / FSDP the gradients are reduced on the last micro-batch
    only); the batch's mean loss (a 0-d tensor, detached) and the target's statistics of the
    last micro-batch."""
    b = imgs.shape[0]
    parts = split_batch(b, run.accum.k)
    total = torch.zeros((), device=run.device)
    stats: dict[str, float] = {}
    for j, part in enumerate(parts):
        with _sync_unless(run, last=j == len(parts) - 1):
            with autocast(run.device, run.amp_dtype):
                out = run.net(imgs[part], mask[part], None if local is None else local[part])
            loss, stats = out.loss, out.stats  # the statistics of the last micro-batch
            if len(parts) > 1:  # this micro-batch's share of the mean over the b images
                loss = loss * ((part.stop - part.start) / b)
            loss.backward()
        total = total + loss.detach().float()
    return total, stats


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


def _sync_unless(run: _Run, last: bool) -> Any:
    """No gradient reduction for every micro-batch but the last of a step
    (:func:`harness.core.parallel.gradient_sync_unless` on the DDP wrapper or the sharded model)."""
    return parallel.gradient_sync_unless(run.ddp if run.ddp is not None else run.model, last)


def _on_nonfinite(run: _Run, value: float, lr: float) -> None:
    """A non-finite loss at step ``run.step`` under ``train.nonfinite``
    (:class:`harness.core.training.NonfinitePolicy`): ``skip`` counts the step without an update,
    ``restore`` reloads the last checkpoint and lowers the lr; each is an event in the log, the
    summary and the checkpoint.

    Raises:
        FloatingPointError: ``stop``, or more than ``nonfinite_max_events`` events in a row.
    """
    run.opt.zero_grad(set_to_none=True)
    at = run.step

    def reload() -> int:
        ck = run.ckpt.load()
        assert ck is not None  # a restoring run writes one before its first step
        _load_training_state(run, ck)
        run.restart = True
        return run.step

    run.step, what = run.nonfinite.handle(at, value, lr, run.ckpt.path if run.ckpt.exists() else None, reload)
    run.log(f"[pretrain {run.cfg.name}] step {at}: loss is {value}; {what}")


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
    model = _full_model(run)  # a collective under FSDP: the model on rank 0, None elsewhere
    if skipped:
        run.log(f"[pretrain {cfg.name}] {len(skipped)} unreadable training image(s) skipped "
                f"(listed in {SUMMARY})")  # fmt: skip
    if model is not None:  # rank 0; the other ranks wait at the barrier below for the outputs
        chash = run.ckpt.config_hash
        meta = {"recipe": cfg.recipe.model_dump(mode="json"), "config_hash": chash, "steps": run.step}
        exported, encoder = model.exported_encoder()  # the student, or an EMA teacher
        encoder.save_timm(out / ENCODER, meta={**meta, "exported": exported})  # type: ignore[operator]
        if recon is not None:
            recon = save_reconstruction_grid(model, run.root, cfg, recon, run.device, run.log)
        atomic_write_text(out / "loss.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
        atomic_write_json(
            out / SUMMARY,
            {
                "status": "ok", "final_loss": run.last_loss, "steps": run.step, "wall_s": wall,
                "config_hash": chash, "encoder": ENCODER, "recon": recon.name if recon else None,
                "skipped_images": {"train": len(skipped)}, "skipped_files": skipped,
                "encoder_definition": encoder_definition(cfg.encoder, cfg.recipe),
                "avgdist": _avgdist(run),
                **({"world_size": run.world} if run.world > 1 else {}),
                "compute": _compute_summary(run), "nonfinite": _nonfinite_summary(run),
                **_teacher_summary(run, exported),
            },
        )  # fmt: skip
    distributed.barrier()
    return PretrainResult(out, out / ENCODER, recon, run.last_loss, run.step, wall)


def _full_model(run: _Run) -> MIMModel | None:
    """The trained model, whole, on rank 0 (None on the other ranks): under FSDP a fresh model
    holding the gathered full state (every rank takes part in the gather)."""
    if not run.fsdp:
        return run.model if run.is_main else None
    state = parallel.model_state(run.model)
    if not run.is_main:
        return None
    model = create_model(run.cfg.encoder, run.cfg.recipe).to(run.device)
    model.load_state_dict(state)
    return model


def _compute_summary(run: _Run) -> dict[str, Any]:
    """What ran: accumulation, FSDP, activation checkpointing, compiled or not (and why not)."""
    t = run.cfg.train
    return {
        "accum_steps": t.accum_steps, "fsdp": run.fsdp,
        "activation_checkpointing": t.activation_checkpointing,
        "compile": t.compile, "compiled": run.compiled, "compile_error": run.compile_error,
    }  # fmt: skip


def _nonfinite_summary(run: _Run) -> dict[str, Any]:
    """The policy, every event, the skipped steps, the restores and the lr scale reached."""
    return run.nonfinite.summary()


def summary_for_record(stage: Path) -> dict[str, Any]:
    """What a task record says about the pretraining of stage directory ``stage``: the
    ``compute`` and ``nonfinite`` blocks of its summary (empty when the summary has none)."""
    path = stage / SUMMARY
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    return {k: summary[k] for k in ("compute", "nonfinite") if k in summary}


def _teacher_summary(run: _Run, exported: str) -> dict[str, Any]:
    """For a recipe with an EMA teacher: which encoder was exported, the collapse count and the
    plot of the target statistics per step (``target_stats.png``)."""
    teacher = run.cfg.recipe.teacher
    if teacher is None:
        return {}
    plot = run.out / TARGET_STATS
    keys = ("target_std", "target_std_within", "cosine")
    series = {k: [h.get(k, math.nan) for h in run.history] for k in keys}
    drawn = {  # targets without a within-image std (iBOT's, CAPI's distributions) keep two panels
        k: v for k, v in series.items() if k != "target_std_within" or any(map(math.isfinite, v))
    }
    atomic_write_bytes(plot, render_series([h["step"] for h in run.history], drawn))
    final = {k: next((v for v in reversed(series[k]) if math.isfinite(v)), None) for k in keys}
    init_share, centre = teacher_mix(teacher, run.total_steps)
    ratio = within_to_batch_ratio(run.history)
    spatial = ratio is not None and ratio < SPATIAL_COLLAPSE_RATIO
    if spatial:
        run.log(f"[pretrain {run.cfg.name}] spatial collapse: over the last 10 steps the "
                f"targets spread {ratio:.2f} times as much within an image as over the batch "
                f"(below {SPATIAL_COLLAPSE_RATIO}): each image's patches get nearly one target, "
                "which a predictor can copy from the visible patches; see target_stats.png")  # fmt: skip
    if exported == "teacher" and init_share > 0.01:
        run.log(f"[pretrain {run.cfg.name}] the exported teacher still holds {init_share:.1%} of "
                f"its random initialisation and averages students centred at {centre:.0%} of the "
                f"run (momentum {teacher.momentum} -> {teacher.momentum_end} over "
                f"{run.total_steps} steps): a schedule slow for this run")  # fmt: skip
    return {
        "exported_encoder": exported,
        # what the exported teacher is made of (pretrain.teacher.teacher_mix): the share of its
        # initialisation left and the mean step of the students it averages (fraction of the run)
        "teacher_init_share": init_share,
        "teacher_centre": None if math.isnan(centre) else centre,
        "target_stats": TARGET_STATS,
        "final_target_std": final["target_std"],
        # the spread within each image: near zero when each image's patches share one target
        # (a spatial collapse that final_target_std, over every patch of the batch, misses)
        "final_target_std_within": final["target_std_within"],
        "collapse": {
            "threshold": teacher.collapse_std,
            "steps": _collapsed_steps(run.history, teacher.collapse_std),
        },
        # pretrain.teacher.within_to_batch_ratio: None for targets without a within-image std
        "spatial_collapse": {
            "within_to_batch_std": ratio,
            "threshold": SPATIAL_COLLAPSE_RATIO,
            "flagged": spatial,
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
