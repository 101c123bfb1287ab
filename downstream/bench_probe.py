"""Faithful vs fast linear probe on the same encoder and data: wall time and accuracy.

    mimbench bench-probe --encoder ENC [--data shapes|PATH] [--json out.json] [--work DIR]

(or ``python -m downstream.bench_probe``, the same options).

ENC is anything ``mimbench eval`` takes (a checkpoint of a supported family, ``random:<preset>``
or a timm model name). Both tasks run in this process, one after the other, through the same
``Task.run`` the suites use:

* fast (``linear_probe``): feature extraction (the cache is bypassed on the first run, so its
  time counts) and the grid of heads; then again with the features cached;
* faithful (``linear_probe_faithful``): MAE's protocol; on small data the batch must shrink
  (``--faithful-batch``; the lr scales with it), every other value stays the paper's unless
  overridden. ``--faithful-base-lr 0.1 budget`` runs it twice: with the paper's lr rule, and
  with the base lr that keeps ImageNet's ``lr x steps`` (:func:`budget_matched_base_lr`; with
  LARS the paper's rule leaves the head near its init on a small dataset).

Optionally kNN (``--knn``) reads the features the fast probe cached. Prints a table and writes
JSON with the times, the ratio faithful / fast and the top-1 difference fast - faithful.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _run(
    task_name: str, cfg: dict[str, Any], encoder: Any, data: Any, seed: int, out: Path
) -> tuple[Any, float]:
    import torch

    from downstream.base import TaskContext, get_task
    from harness.core.config import parse_task_config
    from harness.core.training import pick_device

    ctx = TaskContext(
        data=data,
        seed=seed,
        device=pick_device("auto"),
        out_dir=out / task_name,
        log=lambda m: print(m, flush=True),
    )
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    res = get_task(task_name).run(encoder, parse_task_config({"name": task_name, **cfg}), ctx)
    return res, time.perf_counter() - t0


#: MAE's ImageNet-1k probe: lr 0.1 x 16384 / 256 for 90 epochs of 1281167 // 16384 steps.
IMAGENET_LR_X_STEPS = 0.1 * 16384 / 256 * 90 * (1281167 // 16384)


def budget_matched_base_lr(n_train: int, batch: int, epochs: int) -> float:
    """The base lr that gives ``lr x steps`` of MAE's ImageNet probe at this data size and batch.

    LARS moves each weight matrix by about ``lr x trust_coefficient`` of its norm per step, so
    what the head can learn depends on ``lr x steps``. The paper's rule ``base_lr x batch / 256``
    keeps it at ImageNet's value only for ImageNet's size; on a dataset of 1200 images with batch
    256 it is ~1000x smaller and the head barely leaves its init.
    """
    steps = epochs * max(1, n_train // batch)
    return IMAGENET_LR_X_STEPS / steps / (batch / 256)


def _num_train(data: Any) -> int:
    from harness.core.data.datasets import imagefolder_checked, resolve_imagefolder_root

    return len(imagefolder_checked(resolve_imagefolder_root(data), "train", None))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mimbench bench-probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encoder", required=True, help="checkpoint, random:<preset> or timm model name"
    )
    p.add_argument("--arch", help="encoder preset of the checkpoint (default: inferred)")
    p.add_argument("--data", default="shapes", help="ImageFolder root or 'shapes'")
    p.add_argument(
        "--shapes-per-class", type=int, nargs=2, default=(150, 50), metavar=("TRAIN", "VAL")
    )
    p.add_argument("--eval-crop-pct", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--faithful-batch", type=int, default=256)
    p.add_argument("--faithful-micro-batch", type=int)
    p.add_argument("--faithful-epochs", type=int, default=90)
    p.add_argument("--faithful-warmup", type=float, default=10)
    p.add_argument(
        "--faithful-base-lr",
        nargs="+",
        default=["0.1"],
        help="LARS base lr(s), one faithful run each: numbers, or 'budget' (see the module doc)",
    )
    p.add_argument("--fast-epochs", type=int, default=50)
    p.add_argument("--fast-batch", type=int, default=256)
    p.add_argument("--fast-views", type=int, default=1)
    p.add_argument("--knn", action="store_true", help="also run kNN on the cached features")
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--work",
        help="keep the feature cache and the task outputs here (default: a temporary folder, "
        "removed at the end; on ImageNet the cached features take gigabytes)",
    )
    args = p.parse_args(argv)

    import torch

    from harness.cli import _encoder_for_cli
    from harness.core.config import DataConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    data = DataConfig(
        source=args.data,
        eval_crop_pct=args.eval_crop_pct,
        shapes={
            "train_per_class": args.shapes_per_class[0],
            "val_per_class": args.shapes_per_class[1],
        },
    )
    encoder = _encoder_for_cli(args.encoder, "auto", False, args.arch, None, args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_probe_"))
    try:
        return _bench(args, encoder, data, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, encoder: Any, data: Any, work: Path) -> int:
    """Run the fast and faithful probes (and kNN) with their outputs under ``work``."""
    import torch

    cache = str(work / "features")
    fast_cfg = {
        "epochs": args.fast_epochs,
        "batch_size": args.fast_batch,
        "train_views": args.fast_views,
        "cache_dir": cache,
    }
    fast, t_fast = _run(
        "linear_probe", {**fast_cfg, "cache_features": False}, encoder, data, args.seed, work
    )
    fast_warm, t_fast_warm = _run(
        "linear_probe", fast_cfg, encoder, data, args.seed, work
    )  # writes the cache
    fast_cached, t_fast_cached = _run(
        "linear_probe", fast_cfg, encoder, data, args.seed, work
    )  # reads it
    n_train = _num_train(data)
    runs = []
    for base_lr in args.faithful_base_lr:
        lr = (
            budget_matched_base_lr(n_train, args.faithful_batch, args.faithful_epochs)
            if base_lr == "budget"
            else float(base_lr)
        )
        faithful_cfg = {
            "epochs": args.faithful_epochs,
            "warmup_epochs": args.faithful_warmup,
            "batch_size": args.faithful_batch,
            "micro_batch_size": args.faithful_micro_batch or args.faithful_batch,
            "base_lr": lr,
        }
        res, secs = _run("linear_probe_faithful", faithful_cfg, encoder, data, args.seed, work)
        runs.append(
            {
                "base_lr_rule": "paper (0.1 x batch/256)"
                if base_lr == "0.1"
                else ("ImageNet step budget" if base_lr == "budget" else "given"),
                "top1": res.metrics["top1"],
                "top5": res.metrics["top5"],
                "seconds": secs,
                "steps": res.details["steps"],
                "lr": res.details["lr"],
                "config": faithful_cfg,
                "time_ratio_over_fast": secs / t_fast,
                "time_ratio_over_fast_cached": secs / t_fast_cached,
                "top1_delta_fast_minus_faithful": fast.metrics["top1"] - res.metrics["top1"],
            }
        )
    result: dict[str, Any] = {
        "encoder": args.encoder,
        "data": args.data,
        "threads": torch.get_num_threads(),
        "fast": {
            "top1": fast.metrics["top1"],
            "top5": fast.metrics["top5"],
            "seconds": t_fast,
            "feature_seconds": fast.details["feature_seconds"],
            "head_seconds": fast.details["head_seconds"],
            "seconds_with_cache": t_fast_cached,
            "best_head": fast.details["best_head"],
            "num_heads": len(fast.details["heads"]),
            "config": fast_cfg,
        },
        "faithful": runs,
    }
    del fast_warm, t_fast_warm
    if args.knn:
        knn, t_knn = _run("knn", {"cache_dir": cache}, encoder, data, args.seed, work)
        result["knn"] = {
            "top1": knn.metrics["top1"],
            "top5": knn.metrics["top5"],
            "seconds": t_knn,
            "by_k": knn.details["by_k"],
        }
    print()
    print("| protocol | top-1 | top-5 | wall s | faithful / fast time |")
    print("|---|---|---|---|---|")
    print(
        f"| fast (extract + {result['fast']['num_heads']} heads) | {fast.metrics['top1']:.2f} | "
        f"{fast.metrics['top5']:.2f} | {t_fast:.1f} | |"
    )
    print(
        f"| fast, features cached | {fast_cached.metrics['top1']:.2f} | "
        f"{fast_cached.metrics['top5']:.2f} | {t_fast_cached:.1f} | |"
    )
    for r in runs:
        print(
            f"| faithful (MAE, {args.faithful_epochs} ep, lr {r['lr']:.3g}: {r['base_lr_rule']}) | "
            f"{r['top1']:.2f} | {r['top5']:.2f} | {r['seconds']:.1f} | {r['time_ratio_over_fast']:.1f}x "
            f"({r['time_ratio_over_fast_cached']:.1f}x cached) |"
        )
    if "knn" in result:
        print(
            f"| kNN (k=20, T=0.07) | {result['knn']['top1']:.2f} | {result['knn']['top5']:.2f} | "
            f"{result['knn']['seconds']:.1f} | |"
        )
    for r in runs:
        print(
            f"time ratio faithful / fast: {r['time_ratio_over_fast']:.1f}x; top-1 fast - faithful "
            f"({r['base_lr_rule']}): {r['top1_delta_fast_minus_faithful']:+.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
