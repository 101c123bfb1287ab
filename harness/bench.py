"""``mimbench bench``: throughput, peak memory and FLOPs of every training step the harness runs.

    mimbench bench                                   # every pretraining recipe + every task step
    mimbench bench pretrain/mae pretrain/mae_mask_token --compare pretrain/mae pretrain/mae_mask_token
    mimbench bench task/finetune --arch vit_large_16 --batch 32 --device cuda --csv bench.csv

A *target* is one step kind at one encoder size:

* ``pretrain/<label>``: one optimization step (forward, backward, AdamW) of a recipe
  (:data:`pretrain.bench.BENCH_RECIPES`: ``simmim``, ``mae``, ``mae_mask_token``, ``beit_kmeans``,
  ...). ``--arch`` replaces the recipe's default ViT-B preset for the ViT recipes.
  ``pretrain/<label>+compile`` times the same step through ``torch.compile`` (inductor; what
  ``train.compile`` does): the warm-up step compiles (its seconds are the row's ``compile_s``),
  the timed steps run the compiled code; no FLOP count (the eager row's is the same).
  ``--compare pretrain/mae+compile pretrain/mae`` gives the speedup.
  ``pretrain/<label>+fsdp`` times it sharded as ``train.fsdp`` shards it (one ``fully_shard``
  unit per encoder block), on one device a process group of this process alone: FSDP's
  overhead against the plain step (``--compare pretrain/mae+fsdp pretrain/mae``); no FLOP
  count either.
* ``task/<name>``: the step each registered task declares
  (:meth:`downstream.base.Task.bench_step`, on a random batch at ``--arch``): a frozen forward
  pass for the tasks that work on cached features (fast linear probe, kNN), one optimization
  step for the others (MAE's faithful probe, fine-tuning). The dense tasks (detection,
  segmentation) time their own mmengine training iterations instead
  (:meth:`~downstream.base.Task.bench_pipeline`, :mod:`downstream._mm.bench`: batch 1 / 2,
  1024 / 512 px; FLOPs over one extra iteration without the custom mmcv ops, a lower bound).

Each target runs in its own subprocess so its peak memory is its own: peak resident set on CPU
(``ru_maxrss``, which includes the interpreter and torch, about 0.3-0.5 GB), peak allocated CUDA
memory on a GPU. FLOPs per image come from :class:`torch.utils.flop_counter.FlopCounterMode` over
one extra untimed step (matrix products and convolutions, forward and backward; a multiply-add
counts as 2 FLOPs). On a GPU whose name is in :data:`PEAK_TFLOPS` the achieved FLOP/s is also
given as a fraction of the device's dense bf16 peak (model FLOPs utilization, as in PaLM's MFU).
``--compare A B`` prints the images-per-second ratio A / B of two targets measured in the same
invocation (MAE's visible-only vs mask-token encoder, the fast vs the faithful probe, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downstream.base import BenchBatch, all_tasks, get_task
from harness.cli_args import CliParser, encoder_preset, int_at_least, lazy_help, preset_help
from harness.core.config import EncoderConfig
from harness.core.errors import UserError
from harness.core.fsutil import atomic_write_text
from harness.core.measure import count_flops, peak_fraction, peak_mb, time_step
from harness.core.registry import did_you_mean
from pretrain.bench import BENCH_RECIPES, recipe_step
from pretrain.encoders import create_encoder

#: The order of the task targets in ``mimbench bench``'s list; every other registered task
#: follows, by name. What each target times is the task's own step
#: (:meth:`downstream.base.Task.bench_step` or :meth:`~downstream.base.Task.bench_pipeline`).
TASK_ORDER = (
    "linear_probe",
    "linear_probe_faithful",
    "knn",
    "finetune",
    "detection",
    "segmentation",
)

COLUMNS = (
    "target",
    "arch",
    "img",
    "batch",
    "step_s",
    "img_per_s",
    "peak_mb",
    "gflops_per_img",
    "mfu",
    "device",
)


def all_targets() -> list[str]:
    """Every target name, pretraining recipes first."""
    tasks = all_tasks()
    names = [t for t in TASK_ORDER if t in tasks] + [t for t in tasks if t not in TASK_ORDER]
    return [f"pretrain/{r}" for r in BENCH_RECIPES] + [f"task/{t}" for t in names]


#: The suffix of a pretraining target timed through ``torch.compile``.
COMPILE_SUFFIX = "+compile"
#: The suffix of a pretraining target timed sharded by FSDP (``fully_shard``).
FSDP_SUFFIX = "+fsdp"


def _base_label(label: str) -> str:
    """A pretraining label without its ``+compile`` / ``+fsdp`` suffix."""
    return label.removesuffix(COMPILE_SUFFIX).removesuffix(FSDP_SUFFIX)


def check_targets(targets: list[str]) -> None:
    """Reject unknown target names with a did-you-mean."""
    known = all_targets()
    for t in targets:
        base = _base_label(t) if t.startswith("pretrain/") else t
        if base not in known:
            raise UserError(f"unknown bench target '{t}'{did_you_mean(t, known)}; known: {', '.join(known)}")


def task_step(task: str, arch: str, batch: int, device: Any) -> tuple[Callable[[], None], int]:
    """The bench step of a task (:meth:`downstream.base.Task.bench_step`) on a random batch at
    ``arch`` (1000 classes; bfloat16 autocast on CUDA), and the image side."""
    import torch

    torch.manual_seed(0)
    ecfg = EncoderConfig(arch=arch)
    size = int(ecfg.img_size)  # type: ignore[arg-type]
    enc: Any = create_encoder(ecfg).to(device)
    classes = 1000
    imgs = torch.randn(batch, 3, size, size, device=device)  # [B, 3, H, W]
    labels = torch.randint(0, classes, (batch,), device=device)  # [B]
    try:
        step = get_task(task).bench_step(enc, BenchBatch(imgs, labels, classes, device.type == "cuda"))
    except NotImplementedError:
        raise UserError(f"no step defined for task '{task}'") from None
    return step, size


def pretrain_step(label: str, arch: str | None, batch: int, device: Any, tmp: str) -> tuple[Callable[[], None], int, str]:
    """A recipe's step; ``<label>+compile``: through ``torch.compile``; ``<label>+fsdp``: sharded
    by FSDP."""
    step, _, size, use_arch = recipe_step(_base_label(label), arch, batch, device, tmp,
                                          compile=label.endswith(COMPILE_SUFFIX),
                                          fsdp=label.endswith(FSDP_SUFFIX))  # fmt: skip
    return step, size, use_arch


def measure(target: str, arch: str, batch: int, steps: int, device_name: str, flops: bool = True) -> dict[str, Any]:
    """Measure one target in this process (the CLI runs each in a subprocess)."""
    import torch

    device = torch.device(device_name)
    kind, name = target.split("/", 1)
    dev_label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    timed = get_task(name).bench_pipeline(arch, steps + 1, flops) if kind == "task" else None
    if timed is not None:  # the task timed its own training iterations
        b, step_s, gflops = timed.batch_size, timed.seconds_per_iter, timed.gflops_per_img
        mfu = peak_fraction(gflops * 1e9 * b / step_s, dev_label) if gflops and device.type == "cuda" else None
        return {"target": target, "arch": arch, "img": timed.input, "batch": b, "step_s": step_s,
                "img_per_s": b / step_s, "peak_mb": timed.peak_mb, "gflops_per_img": gflops,
                "mfu": mfu, "device": dev_label}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mimbench-bench-") as tmp:
        if kind == "pretrain":
            step, size, arch = pretrain_step(name, arch, batch, device, tmp)
        else:
            step, size = task_step(name, arch, batch, device)
        compiled = name.endswith(COMPILE_SUFFIX)
        t0 = time.perf_counter()
        times = time_step(step, steps, device)
        compile_s = time.perf_counter() - t0 - sum(times)  # the warm-up step (compiles)
        peak = peak_mb(device)  # before the flop count, whose dispatch mode adds its own memory
        plain = not compiled and not name.endswith(FSDP_SUFFIX)  # FLOPs: the plain row's
        total = count_flops(step) if flops and plain else None
    step_s = statistics.median(times)
    gflops = total / batch / 1e9 if total else None
    mfu = peak_fraction(total / step_s, dev_label) if total and device.type == "cuda" else None
    return {"target": target, "arch": arch, "img": size, "batch": batch, "step_s": step_s,
            "img_per_s": batch / step_s, "peak_mb": peak, "gflops_per_img": gflops, "mfu": mfu,
            "device": dev_label, **({"compile_s": compile_s} if compiled else {})}  # fmt: skip


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of measured rows (and a row per failed target)."""
    head = ("target", "arch", "img", "batch", "step s", "img/s", "peak MB", "GFLOP/img", "MFU",
            "compile s")  # fmt: skip
    body = []
    for r in rows:
        if "error" in r:
            body.append((r["target"], r.get("arch", ""), "", "", "failed: " + r["error"][-60:], "", "", "", "", ""))
            continue
        body.append((r["target"], r["arch"], str(r["img"]), str(r["batch"]), _fmt(r["step_s"], 3),
                     _fmt(r["img_per_s"]), _fmt(r["peak_mb"], 0), _fmt(r["gflops_per_img"], 1),
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                     _fmt(r.get("compile_s"), 1)))  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *body]]
    return "\n".join(lines)


def compare(rows: list[dict[str, Any]], a: str, b: str) -> str:
    """``A vs B: ratio`` of images per second (A / B), e.g. a speedup of A over B."""
    by = {r["target"]: r for r in rows if "error" not in r}
    missing = [t for t in (a, b) if t not in by]
    if missing:
        return f"compare {a} vs {b}: not measured ({', '.join(missing)} missing or failed)"
    ra, rb = by[a], by[b]
    ratio = ra["img_per_s"] / rb["img_per_s"]
    return (f"{a} vs {b}: {ra['img_per_s']:.2f} vs {rb['img_per_s']:.2f} img/s, "
            f"ratio {ratio:.2f}x (step {ra['step_s']:.3f}s vs {rb['step_s']:.3f}s)")  # fmt: skip


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Measured rows as CSV (one column per :data:`COLUMNS`, plus ``compile_s``: the warm-up
    step's seconds of a ``+compile`` row, empty elsewhere; and ``error``)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "compile_s", "error"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(Path(path), buf.getvalue())


def run_targets(targets: list[str], arch: str, batch: int, steps: int, device: str,
                threads: int | None, flops: bool, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure each target in a subprocess of its own; failures become rows with ``error``."""
    rows = []
    for t in targets:
        cmd = [sys.executable, "-m", "harness.bench", "--one", t, "--arch", arch, "--batch",
               str(batch), "--steps", str(steps), "--device", device]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        if not flops:
            cmd.append("--no-flops")
        log(f"[bench] {t} ...")
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
        if proc.returncode or line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"target": t, "arch": arch, "error": err})
            continue
        rows.append(json.loads(line[len("BENCH "):]))
    return rows


def _targets_help() -> str:
    return f"targets to measure (default: all): {', '.join(all_targets())}"


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``mimbench bench`` on ``p`` (help texts list the registered targets and
    encoder presets; bad values are usage errors)."""
    lazy_help(p.add_argument("targets", nargs="*"), _targets_help)
    p.add_argument("--arch", default="vit_base_16", type=encoder_preset,
                   help=preset_help("encoder preset (default vit_base_16)"))
    p.add_argument("--batch", type=int_at_least(1), default=8,
                   help="images per step (dense tasks: 1 / 2)")
    p.add_argument("--steps", type=int_at_least(1), default=3,
                   help="timed steps after one warm-up")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int_at_least(1), help="torch threads on CPU")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="print the img/s ratio A / B (repeatable); both are measured")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--csv", help="write the rows to this CSV file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print("BENCH " + json.dumps(measure(args.one, args.arch, args.batch, args.steps, device,
                                            not args.no_flops)), flush=True)  # fmt: skip
        return 0
    targets = list(args.targets) or all_targets()
    for a, b in args.compare:
        targets += [t for t in (a, b) if t not in targets]
    check_targets(targets)
    if args.batch < 1 or args.steps < 1:
        raise UserError("--batch and --steps must be at least 1")
    rows = run_targets(targets, args.arch, args.batch, args.steps, device, args.threads,
                       not args.no_flops, log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    print(f"batch {args.batch}, median of {args.steps} steps after one warm-up")
    print(format_table(rows))
    for a, b in args.compare:
        print(compare(rows, a, b))
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(build_parser(CliParser(prog="mimbench bench")).parse_args()))
