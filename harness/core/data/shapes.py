"""The embedded synthetic dataset "shapes": seeded images with real structure to learn.

Eight shape classes (:data:`CLASSES`) are drawn in random colors, sizes and rotations on
textured backgrounds (smooth gradients, stripes at a random angle and frequency, rotated
checkerboards, low-frequency value noise). Every object's color is chosen to contrast with the
background under it, and everything is rendered at 4x and box-filtered down, so shapes stay
clean even at 32 px.

Two kinds of images are generated, each written in the on-disk format the downstream tasks read:

- classification images (``image_size`` square): one large primary shape plus up to two small
  distractors; the label is the primary's class. Written as an ImageFolder tree.
- scenes (``scene_size`` square): 1..``max_objects`` non-overlapping shapes. The same scenes are
  written as a COCO instances dataset (detection, instance segmentation) and as an ADE20K-style
  semantic segmentation dataset (label 0 = background, ``class_id + 1`` for shapes).

Everything derives from ``spec.seed``: image ``index`` of a split draws from its own generator
``np.random.default_rng([seed, kind, split_id, index])``, so the output is byte-identical across
runs (on the same numpy/Pillow build) and independent of generation order. :func:`ensure_shapes`
generates into a cache directory keyed by :meth:`ShapesSpec.fingerprint`, atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.core.errors import UserError
from harness.core.fsutil import cache_home

CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "diamond",
)
GENERATOR_VERSION: int = 1
FORMATS: tuple[str, ...] = ("imagefolder", "coco", "ade20k")
SPLITS: tuple[str, ...] = ("train", "val")

_SS = 4  # supersampling factor of the renderer
_KIND_CLASSIFICATION, _KIND_SCENE = 0, 1
_LUMA = np.array([0.299, 0.587, 0.114])
_MIN_PIXEL_DIFF = 70.0  # mean |object - background pixel| over pixels and channels
_MIN_LUMA_DIFF = 45.0  # |luma(object) - luma(mean background)|
_COCO_INFO = {
    "description": "mimbench synthetic shapes", "contributor": "mimbench", "url": "",
    "version": str(GENERATOR_VERSION), "year": 2024, "date_created": "",
}  # fmt: skip
_COCO_LICENSES = [{"id": 1, "name": "CC0-1.0 (synthetic)", "url": ""}]
_ADE_DIRS = {"train": ("training", "ADE_train"), "val": ("validation", "ADE_val")}
#: The smallest allowed value of each :class:`ShapesSpec` field (sizes in px).
_SPEC_MINIMUM: dict[str, int] = {
    "image_size": 8, "train_per_class": 1, "val_per_class": 1, "scene_size": 32,
    "train_scenes": 1, "val_scenes": 1, "max_objects": 1, "seed": 0,
}  # fmt: skip


class ShapesError(UserError, ValueError):
    """A shapes spec or output directory is invalid; the message names the value and the fix."""


@dataclass(frozen=True)
class ShapesSpec:
    """Size and seed of a shapes dataset; its fingerprint names the cache directory.

    Attributes:
        image_size: Side of the classification images (px).
        train_per_class: Classification images per class in the train split.
        val_per_class: Classification images per class in the val split.
        scene_size: Side of the detection / segmentation scenes (px).
        train_scenes: Number of train scenes.
        val_scenes: Number of val scenes.
        max_objects: Most objects per scene (at least 1; fewer when placement fails).
        seed: Seed everything derives from.
    """

    image_size: int = 32
    train_per_class: int = 100
    val_per_class: int = 25
    scene_size: int = 128
    train_scenes: int = 48
    val_scenes: int = 16
    max_objects: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in _SPEC_MINIMUM.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ShapesError(
                    f"shapes dataset: {name} must be an integer >= {low} (got {value!r})"
                )

    def to_dict(self) -> dict[str, int]:
        """The spec as a plain dict (JSON-serializable)."""
        return asdict(self)

    def fingerprint(self) -> str:
        """Short (16 hex chars) sha256 of the spec and :data:`GENERATOR_VERSION`."""
        blob = json.dumps(
            {"spec": self.to_dict(), "generator_version": GENERATOR_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Instance:
    """One object of a rendered image.

    Attributes:
        class_id: Index into :data:`CLASSES`.
        polygon: ``[N, 2]`` outer boundary as (x, y) in pixel coordinates, pixel ``(i, j)``
            covering ``[j, j+1) x [i, i+1)`` (the COCO convention).
        mask: ``[H, W]`` bool, the rasterization of the polygon minus its holes.
        holes: Inner boundaries (only the ring has one), same convention as ``polygon``.
    """

    class_id: int
    polygon: np.ndarray
    mask: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Scene:
    """A rendered image and its non-overlapping objects.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        instances: The objects, in drawing order.
    """

    image: np.ndarray
    instances: list[Instance]

    def label_map(self) -> np.ndarray:
        """``[H, W]`` uint8 semantic labels: 0 = background, ``class_id + 1`` for shapes."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for inst in self.instances:
            labels[inst.mask] = inst.class_id + 1
        return labels


# --------------------------------------------------------------------------- geometry


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    """Vertices of a regular n-gon of circumradius ``radius``, first vertex pointing up."""
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), -np.sin(a)], axis=1) * radius


def _rotation(angle: float) -> np.ndarray:
    """2x2 matrix rotating (x, y) points by ``angle`` (clockwise on screen, y points down)."""
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _unit_shapes() -> dict[str, tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """Outline and holes of every class at unit circumradius, centered on the origin."""
    star = _regular(10)
    star[1::2] *= 0.45
    w = 0.33  # half width of the cross's arms
    arm = np.array([[w, -1], [w, -w], [1, -w]])  # one arm's tip and the corner after it
    cross = np.concatenate([arm @ _rotation(k * np.pi / 2).T for k in range(4)])
    diamond = np.array([[0, -1], [0.55, 0], [0, 1], [-0.55, 0]], float)
    return {
        "circle": (_regular(48), ()),
        "square": (_regular(4, phase=np.pi / 4), ()),
        "triangle": (_regular(3), ()),
        "star": (star, ()),
        "cross": (cross, ()),
        "ring": (_regular(48), (_regular(48, 0.55),)),
        "hexagon": (_regular(6), ()),
        "diamond": (diamond, ()),
    }


_UNIT = _unit_shapes()


def _rasterize(rings: Sequence[np.ndarray], n: int, scale: float) -> np.ndarray:
    """Even-odd fill of polygons sampled at the pixel centers of an ``n x n`` grid.

    Args:
        rings: Closed polygons ``[N, 2]`` (x, y); holes are just more rings.
        n: Grid side.
        scale: Factor from polygon coordinates to grid pixels.

    Returns:
        ``[n, n]`` bool, True where a pixel center is inside.
    """
    yc = np.arange(n) + 0.5
    rows, cols = [], []
    for ring in rings:
        a = ring * scale
        b = np.roll(a, -1, axis=0)
        lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
        r, e = np.nonzero((yc[:, None] >= lo) & (yc[:, None] < hi))  # half-open: no double hits
        t = (yc[r] - a[e, 1]) / (b[e, 1] - a[e, 1])
        x = a[e, 0] + t * (b[e, 0] - a[e, 0])
        rows.append(r)
        cols.append(np.clip(np.ceil(x - 0.5), 0, n).astype(np.int64))  # first center right of x
    r, c = np.concatenate(rows), np.concatenate(cols)
    toggles = np.bincount(r * (n + 1) + c, minlength=n * (n + 1)).reshape(n, n + 1)
    return (np.cumsum(toggles, axis=1)[:, :n] % 2).astype(bool)


def _place(
    rng: np.random.Generator,
    size: int,
    placed: list[tuple[float, float, float]],
    n: int,
    r_lo: float,
    r_hi: float,
    margin: float,
    tries: int = 50,
) -> list[tuple[float, float, float]]:
    """Rejection-sample up to ``n`` more circles (cx, cy, r) inside the image, apart by margin.

    Stops early (placing fewer) when an object finds no free spot in ``tries`` attempts.
    """
    placed = list(placed)
    r_hi = min(r_hi, size / 2 - 1.05)
    r_lo = min(r_lo, r_hi)
    for _ in range(n):
        for _ in range(tries):
            r = rng.uniform(r_lo, r_hi)
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(np.hypot(cx - x, cy - y) >= r + q + margin for x, y, q in placed):
                placed.append((float(cx), float(cy), float(r)))
                break
        else:
            break
    return placed


# --------------------------------------------------------------------------- appearance


def _nearby_color(rng: np.random.Generator, c: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A color at distance ~[lo, hi] from ``c`` in a random RGB direction."""
    d = rng.normal(size=3)
    return np.clip(c + d / (np.linalg.norm(d) + 1e-9) * rng.uniform(lo, hi), 0, 255)


def _value_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] on an ``n x n`` grid from a bicubic-upsampled random lattice."""
    field = np.zeros((n, n), np.float32)
    for octave, amp in ((cells, 1.0), (2 * cells, 0.35)):
        lattice = rng.uniform(0, 1, (octave + 1, octave + 1)).astype(np.float32)
        field += amp * np.asarray(Image.fromarray(lattice).resize((n, n), Image.Resampling.BICUBIC))
    return (field - field.min()) / (np.ptp(field) + 1e-6)


def _background(rng: np.random.Generator, size: int, feature: float) -> np.ndarray:
    """A textured background at supersampled resolution.

    Args:
        rng: The image's generator.
        size: Image side at output resolution (px).
        feature: Typical texture period (px at output resolution).

    Returns:
        ``[size*4, size*4, 3]`` float32 RGB in [0, 255].
    """
    n = size * _SS
    coord = ((np.arange(n) + 0.5) / _SS).astype(np.float32)
    theta = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u = coord[None, :] * cos + coord[:, None] * sin  # rotated coordinates, [n, n] float32
    v = coord[:, None] * cos - coord[None, :] * sin
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    kind = rng.choice(4, p=[0.25, 0.25, 0.2, 0.3])
    if kind == 0:  # smooth linear or radial gradient
        c2 = _nearby_color(rng, c1, 60, 140)
        if rng.random() < 0.5:
            t = (u - u.min()) / np.ptp(u)
        else:
            cx, cy = rng.uniform(0, size, 2)
            t = np.hypot(coord[None, :] - np.float32(cx), coord[:, None] - np.float32(cy))
            t /= np.float32(size * 1.2)
    elif kind == 1:  # stripes, from sine-like to hard edged
        c2 = _nearby_color(rng, c1, 30, 75)
        period, sharp = feature * rng.uniform(0.6, 1.6), rng.uniform(0.5, 6)
        wave = np.sin(u * np.float32(2 * np.pi / period) + np.float32(rng.uniform(0, 2 * np.pi)))
        t = 0.5 + np.tanh(np.float32(sharp) * wave) * np.float32(0.5 / np.tanh(sharp))
    elif kind == 2:  # rotated checkerboard
        c2 = _nearby_color(rng, c1, 30, 70)
        cell = np.float32(feature * rng.uniform(0.5, 1.2))
        t = (np.floor(u / cell) + np.floor(v / cell)) % 2
    else:  # low-frequency noise
        c2 = _nearby_color(rng, c1, 50, 110)
        t = _value_noise(rng, n, int(rng.integers(2, 6)))
    t = np.clip(t, 0, 1).astype(np.float32)
    img = c1 + t[..., None] * (c2 - c1).astype(np.float32)
    if rng.random() < 0.4:  # mix in a gentle brightness gradient
        t2 = ((v - v.min()) / np.ptp(v)).astype(np.float32)
        img *= np.float32(rng.uniform(0.8, 1.0)) + np.float32(rng.uniform(0, 0.4)) * t2[..., None]
    return np.clip(img, 0, 255, out=img)


def _pick_color(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random color contrasting with the background pixels ``region`` ``[..., 3]``.

    Draws 24 random candidates and keeps the first that differs from the pixels by at least
    ``_MIN_PIXEL_DIFF`` on average and from their mean luma by ``_MIN_LUMA_DIFF``; falls back
    to the best candidate (black and white included) when none qualifies.
    """
    px = region.reshape(-1, 3).astype(np.float64)
    cands = np.vstack([rng.uniform(0, 255, (24, 3)), [[0, 0, 0], [255, 255, 255]]])
    d_pix = np.abs(px[None] - cands[:, None]).mean(axis=(1, 2))
    d_luma = np.abs(cands @ _LUMA - px.mean(axis=0) @ _LUMA)
    score = np.minimum(d_pix / _MIN_PIXEL_DIFF, d_luma / _MIN_LUMA_DIFF)
    ok = np.flatnonzero(score[:24] >= 1)
    return cands[ok[0] if ok.size else int(np.argmax(score))]


def _render(
    rng: np.random.Generator,
    size: int,
    feature: float,
    objects: list[tuple[int, float, float, float]],
    background: Callable[[np.random.Generator, int, float], np.ndarray] | None = None,
) -> Scene:
    """Draw ``objects`` (class_id, cx, cy, r) at random rotations on a textured background
    (or on what ``background(rng, size, feature)`` draws: the transfer sets' hook)."""
    canvas = (background or _background)(rng, size, feature)
    n = size * _SS
    angles = rng.uniform(0, 2 * np.pi, len(objects))
    shapes = []
    for (cid, cx, cy, r), ang in zip(objects, angles, strict=True):
        rot = _rotation(ang)
        outline, holes = _UNIT[CLASSES[cid]]
        poly = outline @ rot.T * r + (cx, cy)
        hole_polys = tuple(h @ rot.T * r + (cx, cy) for h in holes)
        x0, y0 = (max(0, int((c - r) * _SS)) for c in (cx, cy))
        x1, y1 = (min(n, int(np.ceil((c + r) * _SS))) for c in (cx, cy))
        step = max(1, int(np.sqrt((x1 - x0) * (y1 - y0) / 400)))  # ~400 samples suffice
        color = _pick_color(rng, canvas[y0:y1:step, x0:x1:step])  # background only: colors first
        shapes.append((cid, poly, hole_polys, color))
    instances = []
    for cid, poly, hole_polys, color in shapes:
        fine = _rasterize([poly, *hole_polys], n, _SS)
        canvas[fine] = color
        mask = fine.reshape(size, _SS, size, _SS).sum(axis=(1, 3), dtype=np.uint8) >= _SS**2 / 2
        instances.append(Instance(int(cid), poly, mask, hole_polys))
    image = canvas.reshape(size, _SS, size * _SS * 3).sum(axis=1)  # box filter: rows, then
    image = image.reshape(size, size, _SS, 3).sum(axis=2) / _SS**2  # columns
    image = image + rng.normal(0, rng.uniform(0, 4), image.shape)  # mild sensor noise
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), instances)


def _rng(spec: ShapesSpec, kind: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return np.random.default_rng([spec.seed % 2**64, kind, SPLITS.index(split), index])


def render_classification_scene(spec: ShapesSpec, split: str, index: int) -> Scene:
    """Classification image ``index`` of ``split`` with its objects (the primary first).

    The primary's class is ``index % len(CLASSES)`` and it is always the largest object.
    """
    rng = _rng(spec, _KIND_CLASSIFICATION, split, index)
    s = spec.image_size
    placed = _place(rng, s, [], 1, 0.28 * s, 0.42 * s, 1.0)
    placed = _place(rng, s, placed, int(rng.integers(0, 3)), 0.07 * s, 0.12 * s, max(1.0, 0.04 * s))
    classes = [index % len(CLASSES), *rng.integers(0, len(CLASSES), len(placed) - 1)]
    objects = [(int(c), *p) for c, p in zip(classes, placed, strict=True)]
    return _render(rng, s, s / 6, objects)


def render_classification_image(spec: ShapesSpec, split: str, index: int) -> tuple[np.ndarray, int]:
    """Classification image ``index`` of ``split``.

    Returns:
        ``[image_size, image_size, 3]`` uint8 image and its class id (the primary's class).
    """
    scene = render_classification_scene(spec, split, index)
    return scene.image, scene.instances[0].class_id


def render_scene(spec: ShapesSpec, split: str, index: int) -> Scene:
    """Detection / segmentation scene ``index`` of ``split``.

    Holds 1..``max_objects`` non-overlapping objects; the first has class
    ``index % len(CLASSES)`` (so every class appears once a split has enough scenes), the
    others random classes.
    """
    rng = _rng(spec, _KIND_SCENE, split, index)
    s = spec.scene_size
    n = int(rng.integers(1, spec.max_objects + 1))
    r_lo = max(0.08 * s, 4.0)  # small enough to be hard, large enough for a faithful polygon
    placed = _place(rng, s, [], n, r_lo, max(0.2 * s, r_lo), max(3.0, 0.03 * s))
    classes = [index % len(CLASSES), *rng.integers(0, len(CLASSES), len(placed) - 1)]
    objects = [(int(c), *p) for c, p in zip(classes, placed, strict=True)]
    return _render(rng, s, s / 10, objects)


# --------------------------------------------------------------------------- writers


def _rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool mask (what ``pycocotools.mask.encode`` returns, as str)."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # counts start with a run of zeros
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(out)}


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    text = json.dumps(
        obj, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":")
    )
    path.write_text(text + "\n", encoding="utf-8")


def _write_imagefolder(root: Path, spec: ShapesSpec) -> dict[str, int]:
    counts = {}
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
        total = per_class * len(CLASSES)
        for i in range(total):
            image, label = render_classification_image(spec, split, i)
            Image.fromarray(image).save(root / split / CLASSES[label] / f"{split}_{i:06d}.png")
        counts[split] = total
    return counts


def _coco_annotation(inst: Instance, ann_id: int, image_id: int) -> dict[str, Any]:
    ys, xs = np.nonzero(inst.mask)
    if inst.holes:  # the ring: a polygon cannot hold a hole, so RLE of the mask
        segmentation: Any = _rle_encode(inst.mask)
    else:
        segmentation = [[round(float(v), 2) for v in inst.polygon.reshape(-1)]]
    x0, y0, x1, y1 = (float(v) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return dict(
        id=ann_id, image_id=image_id, category_id=inst.class_id + 1, iscrowd=0,
        segmentation=segmentation, area=float(inst.mask.sum()), bbox=[x0, y0, x1 - x0, y1 - y0],
    )  # fmt: skip


def _write_scenes(root: Path, spec: ShapesSpec, formats: Sequence[str]) -> dict[str, Any]:
    coco, ade = "coco" in formats, "ade20k" in formats
    ade_root = root / "ade20k" / "ADEChallengeData2016"
    counts: dict[str, Any] = {}
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    for split, n_scenes in (("train", spec.train_scenes), ("val", spec.val_scenes)):
        ade_dir, ade_prefix = _ADE_DIRS[split]
        if coco:
            (root / "coco" / f"{split}2017").mkdir(parents=True)
            (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        if ade:
            (ade_root / "images" / ade_dir).mkdir(parents=True)
            (ade_root / "annotations" / ade_dir).mkdir(parents=True)
        images: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for i in range(n_scenes):
            scene = render_scene(spec, split, i)
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="JPEG", quality=95, subsampling=0)
            if coco:
                name = f"{i:012d}.jpg"
                (root / "coco" / f"{split}2017" / name).write_bytes(buf.getvalue())
                size = spec.scene_size
                images.append(dict(id=i + 1, file_name=name, license=1, height=size, width=size))
                for inst in (inst for inst in scene.instances if inst.mask.any()):
                    anns.append(_coco_annotation(inst, len(anns) + 1, i + 1))
            if ade:
                stem = f"{ade_prefix}_{i:08d}"
                (ade_root / "images" / ade_dir / f"{stem}.jpg").write_bytes(buf.getvalue())
                Image.fromarray(scene.label_map()).save(
                    ade_root / "annotations" / ade_dir / f"{stem}.png"
                )
        if coco:
            coco_json = dict(info=_COCO_INFO, licenses=_COCO_LICENSES, categories=categories,
                             images=images, annotations=anns)  # fmt: skip
            _write_json(root / "coco" / "annotations" / f"instances_{split}2017.json", coco_json)
            counts.setdefault("coco", {})[split] = {"images": n_scenes, "annotations": len(anns)}
        if ade:
            counts.setdefault("ade20k", {})[split] = {"images": n_scenes}
    if ade:
        _write_json(ade_root / "classes.json", list(CLASSES))
    return counts


def _write_dataset(root: Path, spec: ShapesSpec, formats: Sequence[str]) -> dict[str, Any]:
    """Write every requested format into the existing empty directory ``root``; manifest last."""
    counts: dict[str, Any] = {}
    if "imagefolder" in formats:
        counts["imagefolder"] = _write_imagefolder(root / "imagefolder", spec)
    if "coco" in formats or "ade20k" in formats:
        counts.update(_write_scenes(root, spec, formats))
    manifest = {
        "generator": "shapes", "generator_version": GENERATOR_VERSION, "complete": True,
        "fingerprint": spec.fingerprint(), "spec": spec.to_dict(), "classes": list(CLASSES),
        "formats": [f for f in FORMATS if f in formats], "counts": counts,
    }  # fmt: skip
    _write_json(root / "manifest.json", manifest, indent=2)
    return manifest


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        manifest if isinstance(manifest, dict) and manifest.get("generator") == "shapes" else None
    )


def _is_complete(root: Path, spec: ShapesSpec) -> bool:
    m = _read_manifest(root)
    return bool(
        m
        and m.get("complete")
        and m.get("fingerprint") == spec.fingerprint()
        and m.get("generator_version") == GENERATOR_VERSION
        and set(m.get("formats", ())) == set(FORMATS)
    )


def _generate_into_temp(
    parent: Path, prefix: str, spec: ShapesSpec, formats: Sequence[str]
) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        _write_dataset(tmp, spec, formats)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _move_aside(path: Path) -> Path:
    """Move ``path`` into a unique hidden sibling directory (which is returned), so that it can
    be restored or deleted without anyone seeing a half-deleted ``path``."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.replace(path, trash / "x")
    except OSError:
        trash.rmdir()
        raise
    return trash


def generate_shapes(
    out: str | Path, spec: ShapesSpec = ShapesSpec(), formats: Sequence[str] = FORMATS
) -> Path:
    """Generate the dataset into ``out`` (see the module docstring for the layout).

    Writes into a temporary sibling directory and renames it into place, so ``out`` never
    holds a partial dataset. ``out`` may be missing, empty, or a previous shapes output
    (which is replaced).

    Args:
        out: Destination directory.
        spec: What to generate.
        formats: Any of ``"imagefolder"``, ``"coco"``, ``"ade20k"``.

    Returns:
        ``out`` as a Path.

    Raises:
        ShapesError: On an unknown format, or when ``out`` is a file or a non-empty directory
            that is not a shapes dataset.
    """
    out = Path(out).expanduser()
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ShapesError(
            f"unknown shapes formats {unknown or list(formats)}; choose from {FORMATS}"
        )
    previous = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir() or previous and _read_manifest(out) is None:
        raise ShapesError(
            f"{out} is not empty and is not a shapes dataset: choose an empty or "
            "new directory for the output, or delete it first"
        )
    tmp = _generate_into_temp(out.parent, f".{out.name}.tmp-", spec, formats)
    trash = _move_aside(out) if previous else None
    try:
        os.replace(tmp, out)  # replaces an empty directory on POSIX
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:  # put the previous output back
            os.replace(trash / "x", out)
            trash.rmdir()
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return out


def default_cache_root() -> Path:
    """``$MIMBENCH_CACHE/data``, or ``~/.cache/mimbench/data`` when the variable is unset."""
    return cache_home() / "data"


def ensure_shapes(spec: ShapesSpec = ShapesSpec(), cache_root: str | Path | None = None) -> Path:
    """Return ``cache_root/shapes-<fingerprint>``, generating it (all formats) if needed.

    Safe under concurrency: each caller generates into its own temporary sibling and renames it
    into place; a caller that loses the rename race discards its copy and uses the winner's.
    Temporary directories left by killed runs are never taken as a finished dataset.

    Args:
        spec: What to generate.
        cache_root: Parent directory; :func:`default_cache_root` when None.

    Returns:
        The dataset root (holding ``manifest.json``).
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return ensure_generated(root / f"shapes-{spec.fingerprint()}",
                            lambda d: _is_complete(d, spec),
                            lambda d: _write_dataset(d, spec, FORMATS))  # fmt: skip


def ensure_generated(final: Path, complete: Any, write: Any) -> Path:
    """Return ``final``, generating it with ``write(tmp_dir)`` unless ``complete(final)``.

    Safe under concurrency: each caller writes into its own temporary sibling and renames it
    into place; a caller that loses the rename race discards its copy and uses the winner's.
    Also used by the robustness copies (:mod:`harness.core.data.shapes_robust`).
    """
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if complete(final):  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            with contextlib.suppress(FileNotFoundError):  # a broken dir: set it aside, retry
                shutil.rmtree(_move_aside(final), ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"could not move the generated dataset into {final}")
