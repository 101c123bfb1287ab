"""What a suite or sweep costs before it is launched (``mimbench plan SUITE --estimate``).

Per stage: the images it passes through its step, times the seconds per image of that step on
the target hardware, summed into device-hours (the time of one device; N devices share it).

* Pretraining: ``steps = epochs x floor(train images / batch)`` (capped by ``train.max_steps``),
  each step ``batch`` images of the recipe's step (``mimbench bench`` target ``pretrain/<label>``
  at the encoder preset, :func:`pretrain_target`).
* Task runs: the images the task passes through its bench step
  (:meth:`downstream.base.Task.bench_images`: fine-tuning epochs x full batches, the features a
  linear probe extracts, ...), target ``task/<name>``.

Seconds per image come from a bench table: a ``mimbench bench --csv`` file measured on the
target hardware (``--bench-table``), or else the table shipped in ``results/bench/estimates.csv``
(:data:`SHIPPED_TABLE`), whose rows are *estimates*, not measurements: FLOPs per step counted
with :class:`torch.utils.flop_counter.FlopCounterMode` on the step (:func:`shipped_rows`),
divided by a GPU's dense bf16 peak from its vendor's data sheet (:data:`SHIPPED_GPUS`) times an
assumed model-FLOPs utilization (:data:`ASSUMED_MFU`). Assumptions stated on every estimate:
the step time scales linearly with the batch (seconds per image of the bench row), the bench
row's recipe is the recipe's default (a sweep axis that changes the cost per image, a decoder
depth or a mask ratio, is not seen), evaluation passes and data loading are not counted. A
stage whose target and preset are not in the table is listed as not estimated and left out of
the total, which says so: never counted as free.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.bench import pretrain_step, task_step
from harness.core.config import EncoderConfig, RecipeConfig, SuiteConfig
from harness.core.data.datasets import resolve_imagefolder_root
from harness.core.errors import UserError
from harness.core.fsutil import PathLike, atomic_write_text
from harness.core.measure import PEAK_TFLOPS, count_flops
from harness.stages import PretrainStage, SuitePlan, TaskStage, plan_stages
from harness.sweep import SweepRow

#: The table shipped with the repository (estimates, see :func:`shipped_rows`).
SHIPPED_TABLE = Path(__file__).resolve().parents[1] / "results" / "bench" / "estimates.csv"

#: The GPUs of the shipped table: the key of :data:`harness.core.measure.PEAK_TFLOPS` (dense
#: bf16 tensor-core TFLOP/s) and the data sheet it is read from. Only GPUs whose figure is cited.
SHIPPED_GPUS: dict[str, str] = {
    "A100": "NVIDIA A100 Tensor Core GPU data sheet: BF16 Tensor Core 312 TFLOPS dense "
            "(624 with sparsity), SXM and PCIe",
    "H100": "NVIDIA H100 Tensor Core GPU data sheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS "
            "with sparsity, 989 dense (the PCIe card is lower)",
}

#: Model-FLOPs utilization assumed by the shipped table (an assumption, not a measurement).
ASSUMED_MFU = 0.4

#: The (target, encoder preset) rows of the shipped table: the steps of the full-size sweeps
#: (configs/sweeps/: MAE ViT-L/16, SimMIM Swin-B 192 px) and of ViT-B.
SHIPPED_TARGETS: tuple[tuple[str, str], ...] = (
    ("pretrain/mae", "vit_base_16"),
    ("pretrain/mae", "vit_large_16"),
    ("pretrain/mae_mask_token", "vit_large_16"),
    ("pretrain/simmim", "vit_base_16"),
    ("pretrain/simmim_swin", "swin_base_192"),
    ("task/linear_probe", "vit_base_16"),
    ("task/linear_probe", "vit_large_16"),
    ("task/linear_probe", "swin_base_192"),
    ("task/finetune", "vit_base_16"),
    ("task/finetune", "vit_large_16"),
    ("task/finetune", "swin_base_192"),
)

#: Images per step the shipped table's FLOPs are counted at (FLOPs scale with the batch).
SHIPPED_BATCH = 2

#: Columns of the shipped table: ``mimbench bench``'s, then what makes a row an estimate.
SHIPPED_COLUMNS = ("target", "arch", "img", "batch", "step_s", "img_per_s", "peak_mb",
                   "gflops_per_img", "mfu", "device", "estimate", "source")


class EstimateError(UserError, ValueError):
    """A bench table that cannot be read, or data sizes that are not known."""


@dataclass(frozen=True)
class StepTime:
    """Seconds per image of one (target, preset) step, from a bench table row.

    Attributes:
        target: ``pretrain/<label>`` or ``task/<name>``.
        arch: Encoder preset.
        s_per_img: ``step_s / batch`` of the row.
        device: The row's device.
        estimate: Empty for a measurement; else how the row was derived.
    """

    target: str
    arch: str
    s_per_img: float
    device: str
    estimate: str = ""


def read_bench_table(path: PathLike, gpu: str | None = None) -> dict[tuple[str, str], StepTime]:
    """The step times of a ``mimbench bench --csv`` file or of the shipped table.

    Rows with an ``error`` are skipped. Several rows of one (target, arch) are ambiguous unless
    ``gpu`` selects one device (a substring of the ``device`` column).

    Raises:
        EstimateError: The file is missing or lacks the bench columns, a value is not a number,
            or one (target, arch) has rows of several devices and no ``gpu`` picks one.
    """
    p = Path(path)
    if not p.is_file():
        raise EstimateError(f"bench table {p} not found: write one with `mimbench bench --csv "
                            f"{p.name}` on the target hardware")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"target", "arch", "batch", "step_s", "device"}
    if rows and not need <= set(rows[0]):
        raise EstimateError(f"{p}: not a `mimbench bench --csv` table (needs columns "
                            f"{', '.join(sorted(need))})")
    table: dict[tuple[str, str], StepTime] = {}
    for i, r in enumerate(rows, start=2):
        if r.get("error") or (gpu and gpu.lower() not in r["device"].lower()):
            continue
        try:
            s = float(r["step_s"]) / int(r["batch"])
        except ValueError:
            raise EstimateError(f"{p} line {i}: step_s {r['step_s']!r} / batch {r['batch']!r} "
                                "is not a number") from None
        key = (r["target"], r["arch"])
        if key in table and table[key].device != r["device"]:
            raise EstimateError(f"{p}: {key[0]} at {key[1]} has rows of several devices "
                                f"({table[key].device}, {r['device']}): pick one with --gpu")
        table[key] = StepTime(key[0], key[1], s, r["device"], r.get("estimate") or "")
    return table


def pretrain_target(recipe: RecipeConfig, arch: str) -> str:
    """The ``mimbench bench`` target of a pretraining (:data:`pretrain.bench.BENCH_RECIPES`)."""
    name = recipe.name
    if name == "mae" and recipe.encoder_mode == "mask_token":
        return "pretrain/mae_mask_token"
    if name == "simmim" and arch.startswith("swinv2"):
        return "pretrain/simmim_swinv2"
    if name == "simmim" and arch.startswith("swin"):
        return "pretrain/simmim_swin"
    if name == "beit":
        tok = recipe.target.tokenizer
        return "pretrain/beit_kmeans" if tok is not None and tok.type == "kmeans" else (
            "pretrain/beit_dall_e")
    return f"pretrain/{name}"


@dataclass
class StageCost:
    """The estimate of one stage.

    Attributes:
        row: The sweep row (empty outside sweeps).
        kind: ``pretrain`` or the task's name.
        encoder: The encoder entry.
        seed: The seed.
        target: The bench target its step is.
        arch: The encoder preset.
        images: Images through the step in the whole stage (None: the task has no rule).
        steps: Optimization steps (pretraining), else None.
        seconds: Device-seconds (None: not estimated).
        why_not: Why it is not estimated, if it is not.
        estimate: Empty when the step time was measured; else how it was derived.
    """

    row: str
    kind: str
    encoder: str
    seed: int
    target: str
    arch: str
    images: int | None
    steps: int | None
    seconds: float | None
    why_not: str = ""
    estimate: str = ""


def pretrain_steps(epochs: int, n_train: int, batch: int, max_steps: int | None = None) -> int:
    """``epochs x floor(n_train / batch)``, capped by ``max_steps`` (the engine's count)."""
    steps = epochs * (n_train // batch)
    return min(steps, max_steps) if max_steps is not None else steps


def _arch(encoder: EncoderConfig) -> str:
    return encoder.arch


def stage_costs(
    plans: Iterable[SuitePlan], table: dict[tuple[str, str], StepTime], n_train: int, n_val: int
) -> list[StageCost]:
    """The cost of every stage of the plans; a stage several rows share is counted once.

    Args:
        plans: The suite's plan, or each row's of a sweep.
        table: Step times by (target, arch) (:func:`read_bench_table`).
        n_train: Images of the train split.
        n_val: Images of the val split.
    """
    seen: set[str] = set()
    out: list[StageCost] = []
    for plan in plans:
        for st in plan.stages():
            key = st.key if isinstance(st, TaskStage) else f"pretrain:{st.key}"
            if key in seen:
                continue
            seen.add(key)
            out.append(_stage_cost(plan, st, table, n_train, n_val))
    return out


def _stage_cost(plan: SuitePlan, st: PretrainStage | TaskStage,
                table: dict[tuple[str, str], StepTime], n_train: int, n_val: int) -> StageCost:
    arch = _arch(st.entry.encoder)
    steps: int | None = None
    if isinstance(st, PretrainStage):
        t = st.config.train
        target, kind = pretrain_target(st.config.recipe, arch), "pretrain"
        steps = pretrain_steps(t.epochs, n_train, t.batch_size, t.max_steps)
        images: int | None = steps * t.batch_size
    else:
        target, kind = f"task/{st.kind}", st.kind
        images = st.task.bench_images(st.task_cfg, st.entry.encoder, n_train, n_val)
    cost = StageCost(plan.label, kind, st.entry.name, st.seed, target, arch, images, steps, None)
    row = table.get((target, arch))
    if images is None:
        cost.why_not = f"task '{kind}' has no cost rule (Task.bench_images)"
    elif row is None:
        cost.why_not = f"no step time for {target} at {arch} in the bench table"
    else:
        cost.seconds = images * row.s_per_img
        cost.estimate = row.estimate
    return cost


def count_images(cfg: SuiteConfig) -> tuple[int, int]:
    """Images of the suite's train and val splits (files under ``train/`` and ``val/``).

    Raises:
        EstimateError: The data is not readable here (then give the counts).
    """
    try:
        root = resolve_imagefolder_root(cfg.data)
    except UserError as exc:
        raise EstimateError(f"{exc}; to estimate without the data, give its size: "
                            "--train-images N --val-images M (ImageNet-1k: 1281167 / 50000)") from None
    return tuple(sum(len(files) for _, _, files in os.walk(root / split))  # type: ignore[return-value]
                 for split in ("train", "val"))


def _hours(h: float) -> str:
    """``12,345.6`` from 10 hours on, three significant digits below (``0.00533``)."""
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def format_costs(costs: list[StageCost], source: str) -> str:
    """The per-stage table, then the total device-hours and the stages not estimated."""
    head: tuple[str, ...] = ("row", "stage", "encoder", "seed", "target", "arch", "steps",
                             "images", "hours")
    body: list[tuple[str, ...]] = [(c.row, c.kind, c.encoder, str(c.seed), c.target, c.arch,
             "-" if c.steps is None else str(c.steps),
             "-" if c.images is None else str(c.images),
             _hours(c.seconds / 3600) + (" (estimate)" if c.estimate else "")
             if c.seconds is not None else "not estimated") for c in costs]  # fmt: skip
    if not any(c.row for c in costs):
        head, body = head[1:], [b[1:] for b in body]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
             for x in [head, *body]]
    total = sum(c.seconds for c in costs if c.seconds is not None) / 3600
    missing = [c for c in costs if c.seconds is None]
    lines += ["", f"total: {_hours(total)} device-hours over {len(costs) - len(missing)} of "
                  f"{len(costs)} stage(s) (step times: {source})"]
    estimates = sorted({c.estimate for c in costs if c.estimate})
    lines += [f"estimate: {e}" for e in estimates]
    if missing:
        lines.append(f"NOT ESTIMATED ({len(missing)} stage(s), not in the total):")
        lines += [f"  {c.row + ' ' if c.row else ''}{c.kind} {c.encoder} seed {c.seed}: "
                  f"{c.why_not}" for c in missing]
    lines.append("Assumed: step time linear in the batch; each recipe's default step (sweep axes "
                 "that change the cost per image are not seen); evaluation and data loading not "
                 "counted.")
    return "\n".join(lines)


def estimate(cfg: SuiteConfig | list[SweepRow], bench_table: PathLike | None = None,
             gpu: str | None = None, n_train: int | None = None,
             n_val: int | None = None) -> str:
    """``mimbench plan --estimate``: the cost table of a suite or sweep, as text.

    Args:
        cfg: The suite, or a sweep's rows.
        bench_table: A ``mimbench bench --csv`` file from the target hardware (None: the shipped
            estimates, :data:`SHIPPED_TABLE`).
        gpu: Which device's rows to use (a substring of the ``device`` column); the shipped
            table needs one when it holds several GPUs (default: ``H100``).
        n_train: Train images (None: counted in ``data.source``).
        n_val: Val images (None: counted).

    Raises:
        EstimateError: The table or the data sizes (see :func:`read_bench_table`,
            :func:`count_images`).
    """
    rows = cfg if isinstance(cfg, list) else None
    plans = [plan_stages(r.config, r.info) for r in rows] if rows else [plan_stages(cfg)]  # type: ignore[arg-type]
    if n_train is None or n_val is None:
        counted = count_images(plans[0].suite)
        n_train = counted[0] if n_train is None else n_train
        n_val = counted[1] if n_val is None else n_val
    path = Path(bench_table) if bench_table is not None else SHIPPED_TABLE
    if bench_table is None and gpu is None:
        gpu = "H100"
    table = read_bench_table(path, gpu)
    source = (f"{path}" + (f", {gpu}" if gpu else "")) if bench_table is not None else (
        f"shipped estimates {path.name}, {gpu}: FLOPs / (dense bf16 peak x assumed MFU)")
    return (f"{n_train} train / {n_val} val images\n"
            + format_costs(stage_costs(plans, table, n_train, n_val), source))


# --------------------------------------------------------------------------- the shipped table


def shipped_rows(targets: Iterable[tuple[str, str]] = SHIPPED_TARGETS,
                 batch: int = SHIPPED_BATCH, mfu: float = ASSUMED_MFU) -> list[dict[str, Any]]:
    """The rows of the shipped table: each target's FLOPs per step counted on CPU (torch's flop
    counter over one step at ``batch`` images), then per GPU of :data:`SHIPPED_GPUS`:
    ``step_s = FLOPs / (peak x mfu)``.

    Args:
        targets: ``(target, encoder preset)`` pairs.
        batch: Images per counted step.
        mfu: The assumed model-FLOPs utilization.
    """
    out = []
    cpu = torch.device("cpu")
    for target, arch in targets:
        kind, name = target.split("/", 1)
        with tempfile.TemporaryDirectory(prefix="mimbench-estimate-") as tmp:
            if kind == "pretrain":
                step, size, _ = pretrain_step(name, arch, batch, cpu, tmp)
            else:
                step, size = task_step(name, arch, batch, cpu)
            flops = count_flops(step)
        for gpu, sheet in SHIPPED_GPUS.items():
            peak = PEAK_TFLOPS[gpu] * 1e12
            step_s = flops / (peak * mfu)
            out.append({
                "target": target, "arch": arch, "img": size, "batch": batch, "step_s": step_s,
                "img_per_s": batch / step_s, "peak_mb": "", "gflops_per_img": flops / batch / 1e9,
                "mfu": mfu, "device": f"{gpu} (estimate)",
                "estimate": f"FLOPs counted per step / ({PEAK_TFLOPS[gpu]:g} TFLOP/s dense bf16 "
                            f"peak of the {gpu} x MFU {mfu:g}, assumed)",
                "source": sheet,
            })  # fmt: skip
    return out


def write_shipped_table(path: PathLike = SHIPPED_TABLE, **kwargs: Any) -> Path:
    """Write :func:`shipped_rows` as CSV (``python -m harness.estimate --write PATH``)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SHIPPED_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in shipped_rows(**kwargs):
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else v)
                    for k, v in r.items()})
    return atomic_write_text(Path(path), buf.getvalue())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m harness.estimate",
                                 description="write the shipped table of estimated step times")
    ap.add_argument("--write", default=str(SHIPPED_TABLE))
    print(f"wrote {write_shipped_table(ap.parse_args().write)}")
    sys.exit(0)
