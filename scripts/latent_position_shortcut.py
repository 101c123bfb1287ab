"""How much of a latent-target run's loss a predictor can get without reading the predicted
place: from positions alone, or from positions plus the image's average over its context.

For each finished pretraining run given (a directory with ``config.yaml`` and
``checkpoint.pth``, a recipe with an EMA-teacher target), on the val split of its data at the
eval transform, with the run's own masker (seeded, so every run sees the same draws for the
same masking config):

* ``model``: the run's loss (smooth L1 or the recipe's) of the trained predictor on the
  predicted patches: the student and predictor as trained, the final teacher as target;
* ``position``: the same loss when each predicted patch's prediction is the mean target at its
  position over the val images (what a predictor told only the positions could reach);
* ``position_image``: ``position`` plus the image's mean deviation from the position means over
  its context (visible) patches, computed from the teacher's targets there (a global image
  summary a predictor could carry; not a bound, a reference point);
* ``zero``: the loss of predicting zeros (layer-normed targets: each token's mean);
* ``position_share``: :func:`pretrain.teacher.position_share` of the final teacher's targets;
  ``image_share``: the same with the images as the groups (the share of the targets' variance
  that is one vector per image: near 1 is a spatial collapse).

``--at-init`` builds each run's model as its seed initialises it (no checkpoint read): the
same figures before any training (the predictor then predicts nothing useful).

If ``model`` is close to ``position``, the predictor learned little beyond where each patch is.
Issue 13's I-JEPA demo row was read with this (results/latent_demo/README.md)::

    python scripts/latent_position_shortcut.py --at-init runs/latent_demo/pretrain/<run> ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.core.config import PretrainConfig  # noqa: E402
from harness.core.config.loading import load_config  # noqa: E402
from harness.core.data.datasets import (  # noqa: E402
    eval_transform,
    imagefolder_checked,
    resolve_imagefolder_root,
)
from pretrain.model import create_model  # noqa: E402
from pretrain.targets import TargetOut  # noqa: E402
from pretrain.teacher import position_share  # noqa: E402


@torch.no_grad()
def diagnose(run: Path, images: int, batch: int, at_init: bool = False) -> dict[str, float | str]:
    cfg = load_config(run / "config.yaml", kind="pretrain")
    assert isinstance(cfg, PretrainConfig)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.encoder, cfg.recipe)
    if not at_init:
        state = torch.load(run / "checkpoint.pth", map_location="cpu", weights_only=False)["model"]
        model.load_state_dict(state)
    model.eval()
    root = resolve_imagefolder_root(cfg.data)
    ds = imagefolder_checked(root, "val", eval_transform(int(cfg.encoder.img_size), cfg.data.eval_crop_pct))
    n = min(images, len(ds))
    imgs = torch.stack([ds[i][0] for i in range(n)])
    targets = torch.cat([model.target(imgs[i : i + batch]).value for i in range(0, n, batch)])
    mean_at = targets.mean(dim=0)  # [L, D]: each position's mean target
    g = torch.Generator().manual_seed(0)
    sums = {"model": 0.0, "position": 0.0, "position_image": 0.0, "zero": 0.0, "cosine_model": 0.0, "cosine_position": 0.0}
    count = 0
    for i in range(0, n, batch):
        x = imgs[i : i + batch]
        mask = model.masker(len(x), generator=g)
        out = model(x, mask)
        tgt = TargetOut(out.target, out.target_mean, out.target_std)
        predicted = out.mask == 1
        at = mean_at.expand_as(out.pred)
        context = (out.mask == 0).unsqueeze(-1).float()
        shift = ((out.target - at) * context).sum(1, keepdim=True) / context.sum(1, keepdim=True).clamp(min=1)
        k = int(predicted.sum())
        losses = {  # the recipe's own loss, averaged as in training
            "model": float(out.parts["rec"]),
            "position": float(model.target.loss(at, tgt, predicted, cfg.recipe.loss, None)),
            "position_image": float(model.target.loss(at + shift, tgt, predicted, cfg.recipe.loss, None)),
            "zero": float(model.target.loss(torch.zeros_like(at), tgt, predicted, cfg.recipe.loss, None)),
            "cosine_model": float(F.cosine_similarity(out.pred[predicted], out.target[predicted], dim=-1).mean()),
            "cosine_position": float(F.cosine_similarity(at[predicted], out.target[predicted], dim=-1).mean()),
        }
        for key, v in losses.items():
            sums[key] += v * k
        count += k
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return {
        "run": str(run) + (" (init)" if at_init else ""),
        "recipe": cfg.recipe.name,
        "loss": str(cfg.recipe.loss.type),
        "train_final_loss": float(summary.get("final_loss", float("nan"))),
        **{key: v / max(count, 1) for key, v in sums.items()},
        "position_share": position_share(targets),
        "image_share": position_share(targets.transpose(0, 1)),  # images as the groups
        "predicted_patches": count,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="pretraining run directories")
    ap.add_argument("--images", type=int, default=400, help="val images (default 400)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--at-init", action="store_true", help="also each run's model at its init")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [diagnose(r, args.images, args.batch) for r in args.runs]
    if args.at_init:
        rows += [diagnose(r, args.images, args.batch, at_init=True) for r in args.runs]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
