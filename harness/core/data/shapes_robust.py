"""Robustness copies of the synthetic "shapes" dataset, in the real sets' on-disk formats.

Written next to the shapes dataset they derive from (its :class:`ShapesSpec`, the same
renderer, :func:`harness.core.data.shapes.render_classification_scene`), under their own cache
key (:func:`robust_fingerprint`), with the folder names the robustness task reads by default
(:data:`downstream.robustness.DEFAULT_PATHS`):

- ``imagenet-c/<corruption>/<severity>/<class>/*.png``: the val images under
  :data:`CORRUPTIONS` at severities 1..5 (ImageNet-C's layout, Hendrycks & Dietterich, ICLR
  2019). The corruptions are the harness's own simple versions of four of ImageNet-C's fifteen
  (additive Gaussian noise, contrast reduction, pixelation, JPEG re-encoding), their strengths
  growing with the severity; they carry ImageNet-C's names so that the AlexNet normalisation of
  those names applies (which says nothing on synthetic data, but exercises the formula).
- ``imagenet-r/<class>/*.png``: renditions of a subset of the classes (ImageNet-R's 200-of-1000
  layout): only the objects' outlines, dark lines on a light plain background.
- ``imagenet-a/<class>/*.png``: another subset of the classes (ImageNet-A's layout): fresh
  images of the same distribution with a large flat occluder pasted over part of the image.
- ``imagenet-sketch/<class>/*.png``: every class, sketch-like (inverted grayscale edge map).
- ``imagenetv2-matched-frequency-format-val/<index>/*.png``: a fresh draw of the val
  distribution, class folders named by class index ``0..C-1`` (ImageNet-V2's release layout).
- ``real.json``: ReaL-style labels (Beyer et al., "Are we done with ImageNet?", 2020) of the
  shapes val split: one list per val image in file-name order holding every class drawn in it
  (the primary shape and its distractors); every 16th list is empty (an image excluded from
  ReaL accuracy, as the format allows).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from harness.core.data.shapes import (
    CLASSES,
    ShapesError,
    ShapesSpec,
    default_cache_root,
    ensure_generated,
    render_classification_scene,
)

#: Version of this generator (part of the cache key).
ROBUST_VERSION = 1
#: ImageNet-C's names of the corruptions written (see the module docstring).
CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "contrast", "pixelate", "jpeg_compression")
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Class ids of the A-style and R-style subsets (6 of the 8 classes each, different ones).
A_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
R_CLASSES: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
#: Every how many val images a ReaL list is left empty.
REAL_EMPTY_EVERY = 16
#: The folders (and file) written.
LAYOUT: dict[str, str] = {
    "imagenet_a": "imagenet-a", "imagenet_r": "imagenet-r", "imagenet_sketch": "imagenet-sketch",
    "imagenet_v2": "imagenetv2-matched-frequency-format-val", "real": "real.json",
    "imagenet_c": "imagenet-c",
}  # fmt: skip


def robust_fingerprint(spec: ShapesSpec) -> str:
    """Short sha256 of the shapes spec, this generator's version and what it writes."""
    blob = json.dumps({"spec": spec.to_dict(), "robust_version": ROBUST_VERSION,
                       "corruptions": CORRUPTIONS, "a": A_CLASSES, "r": R_CLASSES},
                      sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- image operations


def corrupt(image: np.ndarray, corruption: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 under ``corruption`` at ``severity`` (1..5)."""
    x = image.astype(np.float64)
    if corruption == "gaussian_noise":
        x = x + rng.normal(0.0, 12.0 * severity, x.shape)  # sigma in 0..255 units
    elif corruption == "contrast":
        keep = 1.0 - 0.17 * severity  # fraction of the deviation from the mean kept
        x = (x - x.mean(axis=(0, 1))) * keep + x.mean(axis=(0, 1))
    elif corruption == "pixelate":
        h, w = image.shape[:2]
        side = max(2, int(round(h * (1.0 - 0.15 * severity))))
        small = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
        x = np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float64)
    elif corruption == "jpeg_compression":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=max(1, 32 - 6 * severity))
        x = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float64)
    else:
        raise ValueError(f"unknown corruption '{corruption}': use one of {CORRUPTIONS}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def outline_rendition(masks: list[np.ndarray], size: int) -> np.ndarray:
    """The objects' outlines (a mask pixel with a 4-neighbour outside it) as dark lines on a
    light plain background: ``[size, size, 3]`` uint8."""
    out = np.full((size, size, 3), 235, dtype=np.uint8)
    for m in masks:
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[m & ~inner] = 30
    return out


def sketch_rendition(image: np.ndarray) -> np.ndarray:
    """Sketch-like: the inverted, auto-contrasted edge map of the grayscale image."""
    edges = ImageOps.grayscale(Image.fromarray(image)).filter(ImageFilter.FIND_EDGES)
    gray = ImageOps.autocontrast(ImageOps.invert(edges))
    return np.asarray(gray.convert("RGB"))


def occlude(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A flat gray rectangle over 25-40 % of the image at a random place."""
    h, w = image.shape[:2]
    area = rng.uniform(0.25, 0.40) * h * w
    rh = int(np.clip(np.sqrt(area * rng.uniform(0.6, 1.6)), 2, h - 1))
    rw = int(np.clip(area / rh, 2, w - 1))
    y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    out = image.copy()
    out[y : y + rh, x : x + rw] = int(rng.integers(60, 200))
    return out


# --------------------------------------------------------------------------- writer


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_robust(root: Path, spec: ShapesSpec) -> dict[str, Any]:
    """Write every robustness copy of ``spec``'s val split into the empty directory ``root``
    (see the module docstring); the manifest last. Returns the manifest."""
    n_val = spec.val_per_class * len(CLASSES)
    counts: dict[str, int] = {k: 0 for k in LAYOUT}
    real: list[list[int]] = []
    for i in range(n_val):  # the val split, as shapes writes it: val_<i>.png in class folders
        scene = render_classification_scene(spec, "val", i)
        cid, name = scene.instances[0].class_id, f"val_{i:06d}.png"
        cls = CLASSES[cid]
        rng = np.random.default_rng([spec.seed, 7, i])
        for c in CORRUPTIONS:
            for s in SEVERITIES:
                _save(root / LAYOUT["imagenet_c"] / c / str(s) / cls / name,
                      corrupt(scene.image, c, s, rng))  # fmt: skip
                counts["imagenet_c"] += 1
        _save(root / LAYOUT["imagenet_sketch"] / cls / name, sketch_rendition(scene.image))
        counts["imagenet_sketch"] += 1
        if cid in R_CLASSES:
            masks = [inst.mask for inst in scene.instances]
            _save(root / LAYOUT["imagenet_r"] / cls / name, outline_rendition(masks, spec.image_size))
            counts["imagenet_r"] += 1
        labels = sorted({inst.class_id for inst in scene.instances})
        real.append([] if i % REAL_EMPTY_EVERY == REAL_EMPTY_EVERY - 1 else labels)
    for i in range(n_val, 2 * n_val):  # fresh draws: V2-style and A-style
        scene = render_classification_scene(spec, "val", i)
        cid, name = scene.instances[0].class_id, f"new_{i:06d}.png"
        _save(root / LAYOUT["imagenet_v2"] / str(cid) / name, scene.image)
        counts["imagenet_v2"] += 1
        if cid in A_CLASSES:
            rng = np.random.default_rng([spec.seed, 11, i])
            _save(root / LAYOUT["imagenet_a"] / CLASSES[cid] / name, occlude(scene.image, rng))
            counts["imagenet_a"] += 1
    (root / LAYOUT["real"]).write_text(json.dumps(real) + "\n", encoding="utf-8")
    counts["real"] = len(real)
    manifest = {"generator": "shapes_robust", "robust_version": ROBUST_VERSION,
                "fingerprint": robust_fingerprint(spec), "spec": spec.to_dict(),
                "corruptions": list(CORRUPTIONS), "counts": counts, "complete": True}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _is_complete(root: Path, spec: ShapesSpec) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and m.get("fingerprint") == robust_fingerprint(spec)


def ensure_shapes_robust(spec: ShapesSpec = ShapesSpec(), cache_root: str | Path | None = None) -> Path:
    """``cache_root/shapes-robust-<fingerprint>``, generated (atomically) if needed."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return ensure_generated(root / f"shapes-robust-{robust_fingerprint(spec)}",
                            lambda d: _is_complete(d, spec), lambda d: write_robust(d, spec))


def generate_shapes_robust(out: str | Path, spec: ShapesSpec = ShapesSpec()) -> Path:
    """Write the robustness copies into ``out`` (new or empty; ``mimbench data synth
    --robust``)."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ShapesError(f"{out} is not empty: choose an empty or new directory for the "
                          "robustness copies")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_robust(out, spec)
    return out
