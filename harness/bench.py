"""``mimbench bench``: throughput, peak memory and FLOPs of every training step the harness runs.

    mimbench bench                                   # every pretraining recipe + every task step
    mimbench bench pretrain/mae pretrain/mae_mask_token --compare pretrain/mae pretrain/mae_mask_token
    mimbench bench task/finetune --arch vit_large_16 --batch 32 --device cuda --csv bench.csv

A *target* is one step kind at one encoder size:

* ``pretrain/<label>``: one optimization step (forward, backward, AdamW) of a recipe
  (:data:`pretrain.bench.BENCH_RECIPES`: ``simmim``, ``mae``, ``mae_mask_token``, ``beit_kmeans``,
  ...). ``--arch`` replaces the recipe's default ViT-B preset for the ViT recipes.
* ``task/linear_probe``: the fast probe's cost per image, one frozen forward pass (features are
  extracted once and cached; the heads then train on cached vectors, which is negligible).
* ``task/linear_probe_faithful``: one step of MAE's probe (He et al. 2022, A.2): frozen forward
  with no grad, BatchNorm + linear head forward / backward, LARS.
* ``task/knn``: a frozen forward pass (the kNN vote itself is a matrix product on cached
  features).
* ``task/finetune``: one step of the MAE / BEiT fine-tuning recipe: forward and backward through
  the whole encoder with drop path, average pooling, fc-norm and head, AdamW with layer-wise lr
  decay groups.
* ``task/detection`` / ``task/segmentation``: one mmengine training iteration of the ViTDet Mask
  R-CNN / UperNet pipelines (:mod:`downstream._mm.bench`; batch 1 / 2, 1024 / 512 px). Their
  FLOPs are counted over one extra training iteration (loss forward and backward, no optimizer
  step); custom mmcv ops (RoIAlign, NMS, ...) are not counted, so they are a lower bound
  dominated by the backbone.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.core.measure import count_flops, peak_fraction, peak_mb, time_step

TASK_TARGETS = (
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
    from pretrain.bench import BENCH_RECIPES

    return [f"pretrain/{r}" for r in BENCH_RECIPES] + [f"task/{t}" for t in TASK_TARGETS]


def check_targets(targets: list[str]) -> None:
    """Reject unknown target names with a did-you-mean."""
    from harness.core.registry import did_you_mean

    known = all_targets()
    for t in targets:
        if t not in known:
            raise UserError(f"unknown bench target '{t}'{did_you_mean(t, known)}; known: {', '.join(known)}")


def _task_step(task: str, arch: str, batch: int, device: Any) -> tuple[Callable[[], None], int]:
    """A closure doing one step of a classification task at ``arch``, and the image side."""
    import torch

    from harness.core.config import EncoderConfig
    from pretrain.encoder import create_encoder

    torch.manual_seed(0)
    ecfg = EncoderConfig(arch=arch)
    size = int(ecfg.img_size)  # type: ignore[arg-type]
    enc: Any = create_encoder(ecfg).to(device)
    imgs = torch.randn(batch, 3, size, size, device=device)
    amp = device.type == "cuda"
    classes = 1000
    labels = torch.randint(0, classes, (batch,), device=device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    if task in ("linear_probe", "knn"):
        enc.eval()

        def frozen() -> None:
            with torch.no_grad(), autocast():
                enc.forward_features(imgs)

        return frozen, size
    if task == "linear_probe_faithful":
        from downstream.lars import LARS
        from downstream.linear_probe import ProbeHead

        enc.eval()
        head = ProbeHead(int(enc.num_features), classes).to(device)
        opt = LARS(head.parameters(), lr=0.1)

        def probe() -> None:
            with torch.no_grad(), autocast():
                feats = enc.pool(enc.forward_features(imgs), "cls" if enc.num_prefix_tokens else "avg")
            with autocast():
                loss = torch.nn.functional.cross_entropy(head(feats.float()), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return probe, size
    if task == "finetune":
        from downstream.finetune import FinetuneModel, param_groups_layer_decay, set_drop_path

        set_drop_path(enc, 0.1)
        model = FinetuneModel(enc, classes).to(device).train()
        groups = param_groups_layer_decay(model, 0.05, 0.65)
        adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-4)

        def finetune() -> None:
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(imgs), labels, label_smoothing=0.1)
            adamw.zero_grad(set_to_none=True)
            loss.backward()
            adamw.step()

        return finetune, size
    raise UserError(f"no step defined for task '{task}'")


def _pretrain_step(label: str, arch: str | None, batch: int, device: Any, tmp: str) -> tuple[Callable[[], None], int, str]:
    from pretrain.bench import recipe_step

    step, _, size, use_arch = recipe_step(label, arch, batch, device, tmp)
    return step, size, use_arch


def measure(target: str, arch: str, batch: int, steps: int, device_name: str, flops: bool = True) -> dict[str, Any]:
    """Measure one target in this process (the CLI runs each in a subprocess)."""
    import torch

    device = torch.device(device_name)
    kind, name = target.split("/", 1)
    dev_label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    if kind == "task" and name in ("detection", "segmentation"):
        from downstream._mm.bench import bench as dense_bench

        res = dense_bench(name, arch=arch, iters=steps + 1, batch_size=None, count_flops=flops)
        b = int(res["batch_size"])
        step_s = float(res["seconds_per_iter"])
        peak = res.get("cuda_peak_allocated_mb") or res.get("cpu_peak_rss_mb")
        gflops = res.get("gflops_per_img")
        mfu = peak_fraction(gflops * 1e9 * b / step_s, dev_label) if gflops and device.type == "cuda" else None
        return {"target": target, "arch": arch, "img": res["input"], "batch": b, "step_s": step_s,
                "img_per_s": b / step_s, "peak_mb": peak, "gflops_per_img": gflops, "mfu": mfu,
                "device": dev_label}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mimbench-bench-") as tmp:
        if kind == "pretrain":
            step, size, arch = _pretrain_step(name, arch, batch, device, tmp)
        else:
            step, size = _task_step(name, arch, batch, device)
        times = time_step(step, steps, device)
        peak = peak_mb(device)  # before the flop count, whose dispatch mode adds its own memory
        total = count_flops(step) if flops else None
    step_s = statistics.median(times)
    gflops = total / batch / 1e9 if total else None
    mfu = peak_fraction(total / step_s, dev_label) if total and device.type == "cuda" else None
    return {"target": target, "arch": arch, "img": size, "batch": batch, "step_s": step_s,
            "img_per_s": batch / step_s, "peak_mb": peak, "gflops_per_img": gflops, "mfu": mfu,
            "device": dev_label}  # fmt: skip


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of measured rows (and a row per failed target)."""
    head = ("target", "arch", "img", "batch", "step s", "img/s", "peak MB", "GFLOP/img", "MFU")
    body = []
    for r in rows:
        if "error" in r:
            body.append((r["target"], r.get("arch", ""), "", "", "failed: " + r["error"][-60:], "", "", "", ""))
            continue
        body.append((r["target"], r["arch"], str(r["img"]), str(r["batch"]), _fmt(r["step_s"], 3),
                     _fmt(r["img_per_s"]), _fmt(r["peak_mb"], 0), _fmt(r["gflops_per_img"], 1),
                     "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"))  # fmt: skip
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
    """Measured rows as CSV (one column per :data:`COLUMNS`, plus ``error``)."""
    import io

    from harness.core.fsutil import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "error"], extrasaction="ignore")
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
    from harness.cli import encoder_preset, int_at_least, lazy_help, preset_help

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
    from harness.cli import CliParser

    sys.exit(main(build_parser(CliParser(prog="mimbench bench")).parse_args()))
