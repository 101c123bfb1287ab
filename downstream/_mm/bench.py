"""Speed and memory of a dense task's training iteration (``python -m downstream._mm.bench
detection|segmentation``, ``mimbench bench task/detection``, or :func:`bench` from code).

Trains a randomly initialized encoder of the given preset for a few iterations through the
real pipeline (synthetic scenes in the COCO / ADE20K layouts, the generated mm config, mmengine's
Runner) without evaluation or checkpoints, and reports the median seconds per iteration (the
first, warm-up iteration left out) and the process's peak memory. Run one task per process:
peak RSS is a process-lifetime figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.core.config import EncoderConfig
from harness.core.data.shapes import ShapesSpec, ensure_shapes


def bench(
    task: str,
    arch: str = "vit_base_16",
    iters: int = 4,
    batch_size: int | None = None,
    size: int | None = None,
    threads: int | None = None,
    count_flops: bool = False,
) -> dict[str, Any]:
    """Time ``iters`` training iterations of ``task`` at ``arch``; returns the figures.

    Args:
        task: ``detection`` or ``segmentation``.
        arch: Encoder preset (:data:`harness.core.config.ENCODER_PRESETS`).
        iters: Training iterations (at least 2; the first is not timed).
        batch_size: Images per iteration; default 1 for detection, 2 for segmentation (whose
            UperNet has BatchNorm after a 1 x 1 pooling branch: one image cannot train it).
        size: Input side (detection: LSJ size, default 1024; segmentation: crop, default 512).
        threads: ``torch.set_num_threads`` (default: torch's choice).
        count_flops: After the timed iterations, count the FLOPs of one more training
            iteration (loss forward and backward on one batch, no optimizer step; see
            :class:`downstream._mm.common.TrainIterFlopCounter`) and report them per image as
            ``gflops_per_img``. torch's counter does not see custom mmcv ops (RoIAlign, NMS,
            ...) nor elementwise work: the figure is a lower bound (at the default sizes dominated by
            the backbone; at tiny inputs the fixed-size RoI heads weigh more).
            ``None`` when not counted.
    """
    import torch

    from . import common

    if threads:
        torch.set_num_threads(threads)
    enc = EncoderConfig(arch=arch)
    batch_size = batch_size or (2 if task == "segmentation" else 1)
    with tempfile.TemporaryDirectory(prefix="mimbench-bench-") as tmp:
        spec = ShapesSpec(image_size=8, train_per_class=1, val_per_class=1, scene_size=256,
                          train_scenes=max(4, batch_size), val_scenes=1)  # fmt: skip
        data = ensure_shapes(spec, cache_root=Path(tmp) / "data")
        common_kw: dict[str, Any] = dict(
            encoder=enc, init_checkpoint=None, work_dir=str(Path(tmp) / "work"),
            experiment_name=f"bench-{task}-{time.time_ns()}", with_val=False,
            save_checkpoints=False, amp=False,
        )  # fmt: skip
        if task == "detection":
            from .. import detection as mod
            from . import mmdet_modules  # noqa: F401

            cfg: Any = mod.DetectionConfig(
                img_size=size or 1024,
                batch_size=batch_size,
                max_iters=iters,
                log_level="WARNING",
                log_interval=1,
            )
            mm = mod.build_mm_config(cfg, root=data / "coco", classes=mod.check_coco(data / "coco", None),
                                     **common_kw)  # fmt: skip
            shape = f"{cfg.img_size}x{cfg.img_size}"
        elif task == "segmentation":
            from .. import segmentation as mod
            from . import mmseg_modules  # noqa: F401

            root = data / "ade20k" / "ADEChallengeData2016"
            cfg = mod.SegmentationConfig(
                crop_size=size or 512,
                batch_size=batch_size,
                max_iters=iters,
                log_level="WARNING",
                log_interval=1,
            )
            mm = mod.build_mm_config(cfg, root=root, classes=mod.check_ade(root, None), **common_kw)
            shape = f"{cfg.crop_size}x{cfg.crop_size}"
        else:
            raise ValueError(f"unknown dense task '{task}': use detection or segmentation")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        counter = common.TrainIterFlopCounter() if count_flops else None
        res = common.run_mm(mm, Path(tmp) / f"{task}_config.py", hooks=[counter] if counter else [])
    gflops = (counter.flops / counter.batch_size / 1e9
              if counter and counter.flops is not None and counter.batch_size else None)  # fmt: skip
    return {
        "task": task, "arch": arch, "input": shape, "batch_size": batch_size, "iters": iters,
        "seconds_per_iter": round(res.seconds_per_iter(), 3), "gflops_per_img": gflops,
        "first_iter_seconds": round(res.iter_seconds[0], 3) if res.iter_seconds else None,
        "iter_seconds": [round(t, 3) for t in res.iter_seconds],
        "losses": [round(v, 4) for v in res.losses],
        "peak_rss_mb_before_training": round(rss_before),
        **{k: round(v) for k, v in (counter.memory if counter and counter.memory else res.memory).items()},
        "wall_seconds": round(res.wall_seconds, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m downstream._mm.bench", description=__doc__)
    p.add_argument("task", choices=["detection", "segmentation"])
    p.add_argument("--arch", default="vit_base_16")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None, help="detection: 1; segmentation: 2")
    p.add_argument("--size", type=int, default=None, help="detection: 1024; segmentation: 512")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    out = bench(args.task, args.arch, max(2, args.iters), args.batch_size, args.size, args.threads)
    print(json.dumps(out))
    print(f"{out['task']} {out['arch']} {out['input']} batch {out['batch_size']} on {out['device']}: "
          f"{out['seconds_per_iter']} s/iter (median of {out['iters'] - 1}), peak RSS "
          f"{out['cpu_peak_rss_mb']} MiB" + (f", peak CUDA {out['cuda_peak_allocated_mb']} MiB"
                                              if "cuda_peak_allocated_mb" in out else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
