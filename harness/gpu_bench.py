"""The GPU benchmark, in one command (``scripts/gpu_bench.sh``, ``python -m harness.gpu_bench``).

On a machine with a CUDA device it runs, each as its own ``mimbench bench`` process:

* the pretraining steps (MAE, SimMIM) and the fine-tuning step at ViT-B/16 and ViT-L/16, bf16
  (``mimbench bench`` autocasts to bfloat16 on CUDA);
* the pretraining steps compiled (``mimbench bench pretrain/<recipe>+compile``);
* MAE at ViT-L/16 under FSDP on one device (``mimbench bench pretrain/mae+fsdp``: sharded as
  ``train.fsdp`` shards it, over a process group of the one process) beside the plain step, so
  its row gives FSDP's overhead on one device (two or more devices: ``torchrun ...
  train.fsdp=true``);
* the data benchmark (``mimbench bench data``: images per second per worker of the input
  pipelines);

writes each CSV (and the printed output) under ``results/bench/gpu-<device>-<date>/`` and prints
one summary of img/s and MFU (model FLOPs utilization against the device's dense bf16 peak,
:data:`harness.core.measure.PEAK_TFLOPS`). A step that fails is reported and the others still
run. Without a CUDA device it stops at once with ``no GPU: ...``; ``--dry-run`` prints the
commands without running them (on any machine).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.cli_args import int_at_least
from harness.core.errors import UserError

#: Where the runs' folders go.
RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench"

#: The model steps measured at each size.
TARGETS = ("pretrain/mae", "pretrain/simmim", "task/finetune")

#: The same pretraining steps through ``torch.compile`` (``mimbench bench``'s ``+compile`` targets).
COMPILED_TARGETS = ("pretrain/mae+compile", "pretrain/simmim+compile")

#: The two sizes.
ARCHS = ("vit_base_16", "vit_large_16")

#: The FSDP run: this recipe at this size, sharded on one device, beside the same step plain.
FSDP_RECIPE, FSDP_ARCH = "pretrain/mae", "vit_large_16"

#: Parts that ``--skip`` can leave out.
PARTS = ("eager", "compile", "fsdp", "data")


class NoGPUError(UserError):
    """No CUDA device: the GPU benchmark cannot run here."""


@dataclass(frozen=True)
class BenchRun:
    """One ``mimbench bench`` invocation of the script.

    Attributes:
        name: Its name (also its CSV's stem).
        part: Which of :data:`PARTS` it belongs to.
        argv: The arguments after ``mimbench``.
    """

    name: str
    part: str
    argv: tuple[str, ...]


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(prog="scripts/gpu_bench.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder of this run (default: results/bench/gpu-<device>-<date>)")
    p.add_argument("--batch-base", type=int_at_least(1), default=64, help="ViT-B images per step")
    p.add_argument("--batch-large", type=int_at_least(1), default=32, help="ViT-L images per step")
    p.add_argument("--steps", type=int_at_least(1), default=10, help="timed steps after one warm-up")
    p.add_argument("--skip", action="append", default=[], choices=PARTS,
                   help="leave a part out (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def plan_runs(args: argparse.Namespace, out: Path) -> list[BenchRun]:
    """The ``mimbench bench`` invocations, in order, with their CSVs under ``out``."""
    runs = []
    batch = {"vit_base_16": args.batch_base, "vit_large_16": args.batch_large}
    for arch in ARCHS:
        common = ("--arch", arch, "--batch", str(batch[arch]), "--steps", str(args.steps),
                  "--device", "cuda")
        for part, targets in (("eager", TARGETS), ("compile", COMPILED_TARGETS)):
            name = f"{arch}-{part}"
            runs.append(BenchRun(name, part, ("bench", *targets, *common,
                                              "--csv", str(out / f"{name}.csv"))))
    fsdp = f"{FSDP_RECIPE}+fsdp"
    runs.append(BenchRun("fsdp", "fsdp", (
        "bench", fsdp, FSDP_RECIPE, "--arch", FSDP_ARCH, "--batch", str(batch[FSDP_ARCH]),
        "--steps", str(args.steps), "--device", "cuda", "--compare", fsdp, FSDP_RECIPE,
        "--csv", str(out / "fsdp.csv"))))  # fmt: skip
    runs.append(BenchRun("data", "data", ("bench", "data", "--csv", str(out / "data.csv"))))
    return [r for r in runs if r.part not in args.skip]


def require_gpu() -> str:
    """The CUDA device's name.

    Raises:
        NoGPUError: torch sees no CUDA device.
    """
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError("no GPU: torch.cuda.is_available() is False on this machine; run "
                         "scripts/gpu_bench.sh where a CUDA device is visible (--dry-run prints "
                         "the commands it would run)")
    return str(torch.cuda.get_device_name(0))


def default_out(device: str) -> Path:
    """``results/bench/gpu-<device>-<UTC date>``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "gpu"
    return RESULTS / f"gpu-{slug}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%d}"


def summary(out: Path, runs: list[BenchRun], codes: dict[str, int]) -> str:
    """img/s and MFU of every row of the runs' CSVs, and which runs failed."""
    lines = [f"{'run':<24} {'target':<22} {'img/s':>9} {'MFU':>7}"]
    for r in runs:
        path = out / f"{r.name}.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                ips = row.get("img_per_s") or "-"
                mfu = row.get("mfu") or ""
                mfu_text = f"{100 * float(mfu):.1f}%" if mfu else "-"
                ips_text = f"{float(ips):.1f}" if ips not in ("-", "") else "-"
                lines.append(f"{r.name:<24} {row.get('target', ''):<22} {ips_text:>9} "
                             f"{mfu_text:>7}" + (f"  failed: {row['error']}" if row.get("error")
                                                 else ""))
    failed = [f"{name} (exit {code})" for name, code in codes.items() if code]
    if failed:
        lines.append("failed: " + ", ".join(failed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        out = Path(args.out) if args.out else RESULTS / "gpu-DEVICE-DATE"
        for r in plan_runs(args, out):
            print("mimbench " + " ".join(r.argv))
        return 0
    try:
        device = require_gpu()
    except NoGPUError as exc:
        print(f"gpu_bench: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(args, out)
    codes: dict[str, int] = {}
    for r in runs:
        cmd = [sys.executable, "-m", "harness.cli", *r.argv]
        print(f"[gpu_bench] {device}: mimbench {' '.join(r.argv)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"{r.name}.txt").write_text(proc.stdout + proc.stderr)
        codes[r.name] = proc.returncode
        print(proc.stdout, end="", flush=True)
    text = summary(out, runs, codes)
    (out / "summary.txt").write_text(f"device: {device}\n{text}\n")
    print(text)
    print(f"wrote {out}")
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
