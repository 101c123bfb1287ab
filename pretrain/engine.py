"""The pretraining engine: an explicit training loop in the style of MAE's ``engine_pretrain``.

* AdamW with the papers' linear lr scaling ``lr = base_lr * batch / lr_base_batch``
  (MAE: per 256; SimMIM: per 512), no weight decay on biases, norms, position embeddings and
  tokens (MAE's ``param_groups_weight_decay``).
* Per-iteration schedule: linear warmup then half-cosine to ``min_lr`` (MAE's ``lr_sched``).
* bf16 autocast on a GPU (fused attention through timm's SDPA), fp32 on CPU.
* Checkpoints every ``ckpt_every_steps`` and at the end hold model, optimizer, step and RNG
  states; the data order, augmentation and masks are functions of (seed, epoch/step, index), so a
  resumed run reproduces the uninterrupted loss curve.
* Recipes whose target needs fitting first (BEiT's tokenizers trained here) fit it at the start
  of a fresh run on seeded training images (``model.prepare``); the fitted tokenizer lives in the
  model's state, so a resumed run restores it from the checkpoint.
* Data parallel under ``torchrun`` (:mod:`harness.core.distributed`): ``train.batch_size`` is the
  global batch; each rank takes its disjoint slice of the same seeded global order and of the
  masks generated for the whole global batch, the model is wrapped in DistributedDataParallel
  (gradients averaged over equal slices = the gradient of the global mean loss), the logged loss
  is the mean over ranks, and only rank 0 writes files. Every rank loads the checkpoint on resume;
  checkpoints also hold each rank's RNG state.
* At the end: the encoder alone under timm's key names (``encoder.pth``) and a PNG grid of
  original / masked / the recipe's rows (pixel targets: reconstruction and reconstruction with
  the visible patches pasted; HOG, colors and tokens: target and prediction drawn).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from harness.core import distributed
from harness.core.config import ConfigError, PretrainConfig, dump_config, to_plain
from harness.core.data.datasets import (
    DatasetError,
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
from harness.core.fsutil import atomic_torch_save, atomic_write_json, atomic_write_text, config_hash
from harness.core.tracking import ScalarLogger, progress
from pretrain.model import MIMModel, create_model

CHECKPOINT = "checkpoint.pth"
ENCODER = "encoder.pth"
SUMMARY = "summary.json"


@dataclass
class PretrainResult:
    """Where a finished pretraining put its outputs."""

    out_dir: Path
    encoder_path: Path
    recon_path: Path | None
    final_loss: float
    steps: int
    wall_s: float


def pick_device(pref: str) -> torch.device:
    """``auto`` takes CUDA when available."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU under ``auto``; fp32 (None) on CPU."""
    if pref == "fp32" or (pref == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


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


def lr_at(step: float, total: int, warmup: float, peak: float, min_lr: float) -> float:
    """Linear warmup for ``warmup`` steps, then half-cosine from ``peak`` to ``min_lr``."""
    if step < warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 7_919 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def _image_sampler(ds: SeededDataset, seed: int, device: torch.device):
    """``n -> [n, 3, H, W]``: the first ``n`` readable training images of a seeded order
    (epoch-0 augmentation), cycling when the split is smaller; what tokenizers fit on."""

    def sample(n: int) -> torch.Tensor:
        ds.set_epoch(0)
        order = _epoch_order(len(ds), seed, -1)
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


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = True, log=print) -> PretrainResult:  # noqa: C901
    """Run (or resume) one pretraining.

    Args:
        cfg: The resolved pretraining config.
        out_dir: Stage directory; holds the resolved config, checkpoint, log, encoder and picture.
        resume: Continue from ``out_dir/checkpoint.pth`` when it exists (else start over).
        log: Where progress lines go.
    """
    out = Path(out_dir)
    plain = to_plain(cfg)
    chash = config_hash({k: v for k, v in plain.items() if k not in ("output_dir", "name")})
    t = cfg.train
    # data parallel when launched by torchrun (harness.core.distributed.init_from_env was called)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    is_main = rank == 0
    local_batch = local_batch_size(t.batch_size, world)
    if not is_main:
        log = _silent  # rank 0 reports for everyone
    # every refusal (a checkpoint of another config, missing data, a bad size) comes before the
    # first write, so a refused run leaves the directory as it was
    ckpt_path = out / CHECKPOINT
    resuming = resume and ckpt_path.is_file()
    if world > 1:  # rank 0 decides; every rank must then see the same checkpoint file
        resuming = bool(distributed.broadcast_object(resuming))
        if resuming and not ckpt_path.is_file():
            raise CheckpointError(
                f"rank {rank} cannot see {ckpt_path}, which rank 0 resumes from: the output "
                "directory must be on a filesystem shared by all nodes"
            )
    ck = _load_resumable(ckpt_path, chash) if resuming else None

    device = pick_device(t.device)
    amp_dtype = autocast_dtype(t.precision, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    root = resolve_imagefolder_root(cfg.data)
    img_size = int(cfg.encoder.img_size)  # type: ignore[arg-type]
    # unreadable files are skipped, counted and named on the log (fatal with data.strict_data)
    base_ds = imagefolder_checked(
        root, "train", pretrain_transform(img_size, t.crop_scale, t.hflip),
        strict=cfg.data.strict_data, min_classes=1,
    )  # fmt: skip
    train_ds = SeededDataset(base_ds, cfg.seed)
    skips = SkipTally(base_ds, "pretraining train split")
    skipped_before: set[str] = set()  # unreadable files met by earlier sessions of this run
    n = len(train_ds)
    steps_per_epoch = n // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train split has {n} images, fewer than one batch of {t.batch_size}: lower train.batch_size"
        )
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    warmup_steps = t.warmup_epochs * steps_per_epoch
    peak_lr = t.base_lr * t.batch_size / t.lr_base_batch

    model = create_model(cfg.encoder, cfg.recipe).to(device)
    if is_main:  # nothing refused the run: it is this directory's config from now on
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    if ck is None:
        model.prepare(_image_sampler(train_ds, cfg.seed, device), log)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=peak_lr, betas=t.betas)

    step = 0
    history: list[dict[str, float]] = []
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        history = list(ck["history"])
        skipped_before = set(ck.get("skipped_files", []))
        per_rank = ck.get("rng_ranks")
        if world > 1 and per_rank is not None and len(per_rank) == world:
            _set_rng_state(per_rank[rank], device)
        elif is_main:
            _set_rng_state(ck["rng"], device)
        else:  # a checkpoint from another world size: fresh, still seeded, streams for rank > 0
            torch.manual_seed(_rank_seed(cfg.seed, rank, step))
            random.seed(_rank_seed(cfg.seed, rank, step))
        if world > 1 and int(ck.get("world_size", 1)) != world:
            log(f"[pretrain {cfg.name}] checkpoint written by {ck.get('world_size', 1)} process(es), "
                f"resumed by {world}: the data order and masks continue exactly; the RNG streams "
                "of ranks > 0 (drop path, token corruption) are reseeded")
        log(f"[pretrain {cfg.name}] resumed at step {step}/{total_steps} from {ckpt_path}")
    elif not is_main:
        # rank 0 keeps the single-process RNG stream; the others get their own, so in-forward
        # randomness (drop path, token corruption) is not repeated across ranks
        torch.manual_seed(_rank_seed(cfg.seed, rank))
        random.seed(_rank_seed(cfg.seed, rank))

    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # some parameters never get a gradient (MAE's encoder mask token); DDP must look for
        # them each step (static_graph=True gave wrong cls-token gradients here: 0.2 off)
        ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def save_checkpoint() -> None:
        ck = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "history": history,
            "config_hash": chash,
            "encoder_config": cfg.encoder.model_dump(mode="json"),  # what import builds
            "rng": _rng_state(device),
            "skipped_files": _skipped_files(skipped_before, skips),  # a collective too
        }
        if world > 1:  # a collective: every rank calls it, rank 0 writes
            ck["rng_ranks"] = distributed.all_gather_object(_rng_state(device))
            ck["world_size"] = world
        if is_main:
            atomic_torch_save(ck, ckpt_path)

    log(
        f"[pretrain {cfg.name}] recipe={cfg.recipe.name} encoder={cfg.encoder.arch} "
        f"images={n} batch={t.batch_size} steps={total_steps} lr={peak_lr:.3g} device={device}"
        f"{' bf16' if amp_dtype else ' fp32'}"
        + (f" ranks={world} (batch {local_batch} each)" if world > 1 else "")
    )
    net.train()
    t0 = time.time()
    step_at_start = step
    last_loss = history[-1]["loss"] if history else float("nan")
    scalars = ScalarLogger(out, run_name=out.name, enabled=is_main)
    bar = progress(total=total_steps, initial=step, desc=f"pretrain {cfg.name}", unit="step") if is_main else None
    try:
        while step < total_steps:
            epoch, batch_idx = divmod(step, steps_per_epoch)
            train_ds.set_epoch(epoch)
            order = _epoch_order(n, cfg.seed, epoch)
            # this rank's slice of each global batch (the whole batch for a single process)
            lo = rank * local_batch
            batches = [
                order[i * t.batch_size + lo : i * t.batch_size + lo + local_batch]
                for i in range(batch_idx, steps_per_epoch)
            ]
            loader = DataLoader(
                train_ds, batch_sampler=batches, num_workers=cfg.data.num_workers,
                pin_memory=device.type == "cuda", persistent_workers=False,
                collate_fn=collate_skipping,
            )
            for j, (imgs, _, keep) in enumerate(loader):
                skips.add(batches[j], keep)
                skips.report(log)  # names each unreadable file once
                lr = lr_at(step, total_steps, warmup_steps, peak_lr, t.min_lr)
                for g in opt.param_groups:
                    g["lr"] = lr
                # masks of the whole global batch, then this rank's rows (the union over ranks is
                # the single-process mask), less the rows of unreadable images
                mask = model.masker(t.batch_size, generator=_mask_generator(cfg.seed, step))
                mask = mask[lo : lo + local_batch][keep]  # [b, L]
                if imgs.shape[0] == 0:  # every image unreadable: this step makes no update
                    _check_batch_readable(skips, world, step)
                    step += 1
                    log(f"[pretrain {cfg.name}] step {step}: no readable image in the batch, "
                        "no update")  # fmt: skip
                    if bar is not None:
                        bar.update(1)
                    if step % t.ckpt_every_steps == 0 or step == total_steps:
                        save_checkpoint()
                    if step >= total_steps:
                        break
                    continue
                imgs = imgs.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = net(imgs, mask).loss
                loss_value = distributed.all_reduce_mean(loss.detach())  # global-batch mean
                if not math.isfinite(loss_value):  # the same verdict on every rank
                    raise FloatingPointError(
                        f"loss is {loss_value} at step {step}; the last good checkpoint is "
                        f"{ckpt_path if ckpt_path.exists() else '(none yet)'}. Lower train.base_lr or "
                        "set train.clip_grad"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if t.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
                opt.step()
                step += 1
                model.after_step(step)
                last_loss = loss_value
                history.append({"step": step, "loss": last_loss, "lr": lr})
                scalars.scalars({"pretrain/loss": last_loss, "pretrain/lr": lr}, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                if step % t.log_every_steps == 0 or step == total_steps:
                    el = time.time() - t0
                    rate = (step - step_at_start) * t.batch_size / max(el, 1e-9)
                    eta = (total_steps - step) * t.batch_size / max(rate, 1e-9)
                    log(
                        f"[pretrain {cfg.name}] step {step}/{total_steps} epoch {epoch} "
                        f"loss {last_loss:.4f} lr {lr:.3g} {rate:.1f} img/s eta {eta:.0f}s"
                    )
                if step % t.ckpt_every_steps == 0 or step == total_steps:
                    save_checkpoint()
                if step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
        scalars.close()

    wall = time.time() - t0
    recon = out / "recon.png" if t.num_recon_images > 0 else None
    skipped = _skipped_files(skipped_before, skips)  # a collective: before the rank-0 block
    if skipped:
        log(f"[pretrain {cfg.name}] {len(skipped)} unreadable training image(s) skipped "
            f"(listed in {SUMMARY})")  # fmt: skip
    if is_main:  # the other ranks wait at the barrier below until the outputs exist
        meta = {"recipe": cfg.recipe.model_dump(mode="json"), "config_hash": chash, "steps": step}
        model.encoder.save_timm(out / ENCODER, meta=meta)
        if recon is not None:
            recon = save_reconstruction_grid(model, root, cfg, recon, device, log)
        atomic_write_text(out / "loss.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        atomic_write_json(
            out / SUMMARY,
            {
                "status": "ok", "final_loss": last_loss, "steps": step, "wall_s": wall,
                "config_hash": chash, "encoder": ENCODER, "recon": recon.name if recon else None,
                "skipped_images": {"train": len(skipped)}, "skipped_files": skipped,
                **({"world_size": world} if world > 1 else {}),
            },
        )
    distributed.barrier()
    return PretrainResult(out, out / ENCODER, recon, last_loss, step, wall)


def _load_resumable(ckpt_path: Path, chash: str) -> dict[str, Any]:
    """The checkpoint to resume from, read before anything is written.

    Raises:
        CheckpointError: The checkpoint was written by a different config (hash ``chash`` is the
            resolved config's, less its name and output directory).
    """
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ck.get("config_hash") != chash:
        raise CheckpointError(
            f"{ckpt_path} was written by a different config (hash {ck.get('config_hash')} vs "
            f"{chash}); use another output directory or delete it to start over"
        )
    return ck


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
    from harness.core.fsutil import atomic_write_bytes
    from pretrain.viz import render_recon_grid

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


def main_log(msg: str) -> None:
    """Default logger: stdout, flushed."""
    print(msg, file=sys.stdout, flush=True)
