"""Step time and peak memory of every recipe at ViT-B size, and MAE's visible-only speedup.

    python -m pretrain.bench                      # every recipe, batch 8, 3 timed steps
    python -m pretrain.bench --recipes mae simmim --steps 5 --device cuda

Each recipe runs in its own subprocess (so peak memory is its own): one warm-up step, then
``--steps`` timed optimization steps (forward, backward, AdamW) on random images. Peak memory is
the process's peak resident set on CPU (``ru_maxrss``, which includes the ~0.3-0.5 GB of Python
and torch) and the peak allocated CUDA memory on a GPU. Tokenizers are fitted on a few random
images with a single k-means iteration: the figures are per-step costs, not tokenizer fitting.

The MAE comparison (He et al. 2022, Table 2: 2.8x to 4.1x wall-clock on TPUs) times the same
ViT-B MAE at mask ratio 0.75 with the encoder on the visible 25 % of patches and with mask tokens
on all patches, whole step (8-block, 512-wide decoder in both) and encoder alone (forward +
backward). Timings on a shared CPU are noisy: the script prints the median of the timed steps.
``target s`` times the target alone (no gradient) plus the after-step hook: for the latent
recipes the EMA teacher's forward and update, the teacher's share of a step (``target %``: its
time over the whole step's, which includes the same teacher pass). iBOT's batches are two views
of each image (``recipe.global_crops``) and its recipe's 10 local crops (``recipe.local_crops``,
96 px, the student's alone); data2vec 2.0's step encodes 16 masked clones of each
image (``recipe.clone_batch``) against one teacher pass (``data2vec2_clone1``: one clone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.core import distributed, parallel
from harness.core.config import EncoderConfig, RecipeConfig
from harness.core.measure import peak_mb, sync, time_step
from pretrain.dall_e import DallEEncoder
from pretrain.engine import param_groups
from pretrain.model import create_model

# recipe label -> (encoder preset, recipe overrides)
BENCH_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "simmim": ("vit_base_16", {"name": "simmim"}),
    "simmim_swin": ("swin_base_192", {"name": "simmim"}),
    # SimMIM's SwinV2-B (the Swin repo's simmim_pretrain__swinv2_base__img192_window12__800ep)
    "simmim_swinv2": ("swinv2_base_192", {"name": "simmim"}),
    "mae": ("vit_base_16", {"name": "mae"}),
    # MAE's ablation (He et al. 2022, Table 1c): the encoder also runs on mask tokens
    "mae_mask_token": ("vit_base_16", {"name": "mae", "encoder_mode": "mask_token"}),
    "beit_kmeans": (
        "vit_base_16",
        {
            "name": "beit",
            "target": {
                "tokenizer": {
                    "type": "kmeans",
                    "input_size": None,
                    "train_images": 48,
                    "kmeans_iters": 1,
                }
            },
        },
    ),
    "beit_dall_e": ("vit_base_16", {"name": "beit"}),  # DALL-E-shaped encoder, random weights
    "maskfeat": ("vit_base_16", {"name": "maskfeat"}),
    "vit_mpp": ("vit_base_16", {"name": "vit_mpp"}),
    "context_encoder": ("ce_conv_128", {"name": "context_encoder"}),
    # latent targets of an EMA teacher (pretrain/teacher.py)
    "data2vec": ("vit_base_16", {"name": "data2vec"}),
    "ijepa": ("vit_base_16", {"name": "ijepa"}),
    "data2vec2": ("vit_base_16", {"name": "data2vec2"}),  # 16 clones per image
    "data2vec2_clone1": ("vit_base_16", {"name": "data2vec2", "clone_batch": 1}),
    "ibot": ("vit_base_16", {"name": "ibot"}),
    "capi": ("vit_base_16", {"name": "capi"}),
}


def recipe_overrides(label: str, tmp: str) -> dict[str, Any]:
    """The recipe config of a bench label; BEiT's DALL-E tokenizer gets random weights in
    ``tmp`` (the real file cannot be downloaded here; its cost per step is the same)."""
    rec = dict(BENCH_RECIPES[label][1])
    if label == "beit_dall_e":
        path = os.path.join(tmp, "dall_e_random.pth")
        torch.save(DallEEncoder().state_dict(), path)
        rec = {**rec, "target": {"tokenizer": {"path": path}}}
    return rec


def random_batch(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Random images for a recipe's step: ``[B, 3, H, W]``, or ``[B, V, 3, H, W]`` with views
    (``recipe.global_crops``, iBOT)."""
    views = int(model.recipe.global_crops)
    shape = (batch, views, 3, size, size) if views > 1 else (batch, 3, size, size)
    return torch.randn(*shape, device=device)


def random_local(model: torch.nn.Module, batch: int, device: torch.device) -> torch.Tensor | None:
    """Random local crops of a recipe's step, ``[B, V_local, 3, h, h]`` (``recipe.local_crops``
    at ``recipe.local_crop_size``, iBOT's multi-crop), or None without them."""
    r = model.recipe
    if not r.local_crops:
        return None
    return torch.randn(batch, r.local_crops, 3, r.local_crop_size, r.local_crop_size, device=device)


def recipe_step(
    label: str, arch: str | None, batch: int, device: torch.device, tmp: str,
    compile: bool = False, fsdp: bool = False,
) -> tuple[Callable[[], None], torch.nn.Module, int, str]:
    """One recipe's model and a closure doing one optimization step (forward, backward, AdamW)
    on a fixed random batch; ``arch`` replaces the default preset of the ViT recipes. With
    ``compile`` the model runs through ``torch.compile`` (what ``train.compile`` does; the first
    call compiles). With ``fsdp`` it is sharded as the engine's ``train.fsdp`` shards it (one
    ``fully_shard`` unit per encoder block, then the root; the optimizer over the sharded
    parameters), over the ranks of the process group, or over this process alone when there is
    none (:func:`harness.core.distributed.init_single_process`): FSDP's gather / reduce path on
    one device.

    Returns:
        ``(step, model, image side, encoder preset used)``.
    """

    default_arch, _ = BENCH_RECIPES[label]
    use_arch = arch if arch and default_arch.startswith("vit_") else default_arch
    torch.manual_seed(0)
    enc = EncoderConfig(arch=use_arch)
    model = create_model(enc, RecipeConfig(**recipe_overrides(label, tmp))).to(device)
    size = int(enc.img_size)  # type: ignore[arg-type]
    model.prepare(lambda n: torch.randn(n, 3, size, size, device=device), log=lambda m: None)
    if fsdp:
        distributed.init_single_process()
        parallel.shard_blocks(model, model.encoder.residual_blocks(), device)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)  # after sharding: over shards
    imgs = random_batch(model, batch, size, device)
    local = random_local(model, batch, device)
    mask = model.masker(batch, generator=torch.Generator().manual_seed(0)).to(device)
    amp = device.type == "cuda"
    net = parallel.compile_module(model) if compile else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = net(imgs, mask, local).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model, size, use_arch


def time_recipe(
    label: str, batch: int, steps: int, device: torch.device, tmp: str
) -> dict[str, Any]:
    """Build one recipe's model and time ``steps`` optimization steps after one warm-up."""
    step, model, size, arch = recipe_step(label, None, batch, device, tmp)
    times = time_step(step, steps, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    imgs = random_batch(model, batch, size, device)

    def target_step() -> None:  # the target (an EMA teacher's forward) and the after-step hook
        with torch.no_grad():
            model.target(imgs)
        model.after_step(1)

    target_times = time_step(target_step, steps, device)
    return {
        "recipe": label,
        "encoder": arch,
        "img": size,
        "batch": batch,
        "step_s": statistics.median(times),
        "steps_s": times,
        "target_s": statistics.median(target_times),  # within the step: its target's share
        "peak_mb": peak_mb(device),
        "trainable_params_m": n_params / 1e6,
    }


def time_mae_modes(
    batch: int,
    steps: int,
    device: torch.device,
    arch: str = "vit_base_16",
    head: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Median step time of MAE at ratio 0.75 (ViT-B, 8x512 decoder by default): visible-only vs
    mask-token encoder, whole step and encoder alone."""

    out: dict[str, Any] = {}
    enc = EncoderConfig(arch=arch)
    size = int(enc.img_size)  # type: ignore[arg-type]
    imgs = torch.randn(batch, 3, size, size, device=device)
    amp = device.type == "cuda"
    for mode in ("visible", "mask_token"):
        torch.manual_seed(0)
        rec = RecipeConfig(name="mae", encoder_mode=mode, **({"head": head} if head else {}))
        model = create_model(enc, rec).to(device)
        mask = model.masker(batch, generator=torch.Generator().manual_seed(0)).to(device)
        full, encoder_only = [], []
        for i in range(steps + 1):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(imgs, mask).loss
            loss.backward()
            sync(device)
            t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                tokens, _ = model.encode(imgs, mask)
            tokens.float().mean().backward()
            sync(device)
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if i > 0:
                full.append(t1 - t0)
                encoder_only.append(t2 - t1)
        out[mode] = {
            "step_s": statistics.median(full),
            "encoder_s": statistics.median(encoder_only),
        }
        del model
    out["speedup_step"] = out["mask_token"]["step_s"] / out["visible"]["step_s"]
    out["speedup_encoder"] = out["mask_token"]["encoder_s"] / out["visible"]["encoder_s"]
    return out


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.one == "mae_modes":
            res = time_mae_modes(args.batch, args.steps, device)
        else:
            res = time_recipe(args.one, args.batch, args.steps, device, tmp)
    print("BENCH " + json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench", description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="*", default=list(BENCH_RECIPES), choices=list(BENCH_RECIPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-mae-speedup", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _child(args)
        return 0
    jobs = list(args.recipes) + ([] if args.no_mae_speedup else ["mae_modes"])
    results = []
    dev = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {args.threads} threads"
    )
    print(f"device: {dev}; batch {args.batch}; median of {args.steps} steps after one warm-up")
    print(f"{'recipe':<16} {'encoder':<14} {'img':>4} {'step s':>8} {'peak MB':>9} {'params M':>9} "
          f"{'target s':>9} {'target %':>9}")
    for job in jobs:
        cmd = [
            sys.executable,
            "-m",
            "pretrain.bench",
            "--one",
            job,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
        if proc.returncode or line is None:
            print(f"{job:<16} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        res = json.loads(line[6:])
        results.append(res)
        if job == "mae_modes":
            v, m = res["visible"], res["mask_token"]
            print(
                f"\nMAE ViT-B, ratio 0.75, batch {args.batch}: visible-only vs mask-token encoder"
            )
            print(
                f"  whole step   {v['step_s']:.3f}s vs {m['step_s']:.3f}s  speedup {res['speedup_step']:.2f}x"
            )
            print(
                f"  encoder only {v['encoder_s']:.3f}s vs {m['encoder_s']:.3f}s  speedup {res['speedup_encoder']:.2f}x"
            )
            print("  (paper, Table 2: 2.8x-4.1x wall-clock for ViT-L/H on 128 TPU-v3 cores)")
        else:
            print(
                f"{res['recipe']:<16} {res['encoder']:<14} {res['img']:>4} {res['step_s']:>8.3f} "
                f"{res['peak_mb']:>9.0f} {res['trainable_params_m']:>9.1f} {res['target_s']:>9.3f} "
                f"{100 * res['target_s'] / res['step_s']:>8.1f}%"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "batch": args.batch, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
