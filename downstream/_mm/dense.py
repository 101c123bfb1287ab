"""The run of a dense task shared by detection and segmentation: export the encoder's weights,
generate the mm config, key the work directory by its hash (so an interrupted run resumes and
a changed config starts over), train and evaluate, summarize."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.core.config import ConfigError
from harness.core.fsutil import config_hash, sha256_file
from pretrain.encoders.base import Encoder

from ..base import TaskContext

# build(init_checkpoint, work_dir, experiment_name, amp) -> full mm config
ConfigBuilder = Callable[[str, str, str, bool], dict[str, Any]]


#: Encoder families with a dense backbone: ``vit`` (ViTDet / BEiT backbones of our own),
#: ``swin`` (mmdet's / mmseg's Swin with the weights mapped in) and ``swinv2`` (our own SwinV2).
DENSE_FAMILIES = ("vit", "swin", "swinv2")


def dense_family(encoder: Encoder, task: str) -> str:
    """The encoder's family if it has a dense backbone (:data:`DENSE_FAMILIES`); other
    families fail with a clear message."""
    if encoder.family in DENSE_FAMILIES:
        return encoder.family
    raise ConfigError(
        f"{task} supports ViT, Swin and SwinV2 encoders; encoder '{encoder.cfg.arch}' is a "
        f"{encoder.family} encoder, which has no dense backbone: evaluate it with linear_probe, "
        "knn or finetune instead"
    )


def run_dense_task(
    task: str,
    encoder: Encoder,
    ctx: TaskContext,
    build: ConfigBuilder,
    module: str,
    amp: str = "auto",
) -> Any:
    """Train and evaluate one mm config built by ``build``; returns a ``common.MMRunResult``.

    ``encoder`` is a ViT or a Swin encoder (:func:`dense_family`); it is handed
    over as a file (``encoder_init.pth`` in ``ctx.out_dir``, loaded
    weights-only by the backbone), so the caller's encoder is never modified.
    """
    dense_family(encoder, task)
    importlib.import_module(module)  # registers our types in mmdet's / mmseg's registries
    from .common import VERBOSE_ENV, run_mm

    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    init = out / "encoder_init.pth"
    encoder.save_timm(init)
    use_amp = amp == "on" or (amp == "auto" and torch.cuda.is_available())
    probe = build(str(init), "<work_dir>", "<name>", use_amp)
    h = config_hash({"config": probe, "encoder_sha256": sha256_file(init)})[:12]
    work_dir = out / f"mm-{h}"
    name = f"{task}-{h[:8]}-{uuid.uuid4().hex[:6]}"
    cfg = build(str(init), str(work_dir), name, use_amp)
    ctx.log(f"[{task}] mm config: {out / f'{task}_config.py'}; work dir {work_dir} (OpenMMLab's "
            f"log: <work dir>/<time>/<time>.log; {VERBOSE_ENV}=1 also prints it here)")
    return run_mm(cfg, out / f"{task}_config.py")


def run_details(res: Any) -> dict[str, Any]:
    """Loss curve summary, timings and memory of a run for a record's ``details``."""
    losses = res.losses
    k = max(1, min(5, len(losses) // 3))
    return {
        "iters_run": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_mean_first": sum(losses[:k]) / k if losses else None,
        "loss_mean_last": sum(losses[-k:]) / k if losses else None,
        "losses": losses[:: max(1, len(losses) // 200)],
        "seconds_per_iter": res.seconds_per_iter(),
        "wall_seconds": res.wall_seconds,
        "memory": res.memory,
        "mm_config": str(res.config_path),
        "work_dir": str(res.work_dir),
        "raw_metrics": {
            k2: float(v) for k2, v in res.metrics.items() if isinstance(v, int | float)
        },
    }
