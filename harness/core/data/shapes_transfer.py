"""Small synthetic classification sets for the transfer suite, drawn by the shapes renderer.

Each set (:class:`TransferSetSpec`) is a subset of the shape classes of
:mod:`harness.core.data.shapes` at its own image size, counts, object scale, number of small
distractors and background (the shapes' textured backgrounds, or flat colour), so that an
encoder pretrained on "shapes" meets several related but different downstream sets, as VTAB /
fine-grained transfer sets relate to ImageNet. Written as an ImageFolder tree
(``<root>/imagefolder/{train,val}/<class>/*.png``) with a ``manifest.json`` beside it.

Image ``index`` of a split draws from ``np.random.default_rng([seed, 2, split_id, index])``
(kind 2: the shapes dataset uses 0 and 1); its class is ``classes[index % len(classes)]``.
:func:`ensure_transfer_set` generates into a cache directory keyed by
:meth:`TransferSetSpec.fingerprint` (``shapes-transfer-<hex>``, never a shapes dataset's key),
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .shapes import CLASSES, SPLITS, ShapesError, _background, _place, _render, default_cache_root

#: Bump when the images of a spec change (part of the cache key).
TRANSFER_GENERATOR_VERSION = 1
_KIND_TRANSFER = 2


@dataclass(frozen=True)
class TransferSetSpec:
    """One synthetic transfer set.

    Attributes:
        classes: Shape classes (two or more of :data:`harness.core.data.shapes.CLASSES`).
        image_size: Image side (px).
        train_per_class: Train images per class.
        val_per_class: Val images per class.
        background: ``textured`` (the shapes' backgrounds) or ``flat`` (one random colour).
        distractors: Most small distractor shapes per image (0 to 2).
        scale: Radius range of the main shape, as fractions of the image side.
        seed: Seed everything derives from.
    """

    classes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    image_size: int = 32
    train_per_class: int = 40
    val_per_class: int = 20
    background: Literal["textured", "flat"] = "textured"
    distractors: int = 2
    scale: tuple[float, float] = (0.28, 0.42)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            raise ShapesError(f"transfer set classes must be two or more distinct names of "
                              f"{', '.join(CLASSES)}; got {list(self.classes)}")
        if self.background not in ("textured", "flat"):
            raise ShapesError(f"transfer set background must be textured or flat, got "
                              f"{self.background!r}")
        lo, hi = self.scale
        if not 0.05 <= lo <= hi <= 0.45:
            raise ShapesError(f"transfer set scale must be 0.05 <= lo <= hi <= 0.45, got "
                              f"{list(self.scale)}")
        for name, low in (("image_size", 8), ("train_per_class", 1), ("val_per_class", 1),
                          ("seed", 0), ("distractors", 0)):
            if int(getattr(self, name)) < low:
                raise ShapesError(f"transfer set {name} must be >= {low}")
        if self.distractors > 2:
            raise ShapesError("transfer set distractors must be 0, 1 or 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransferSetSpec:
        """A spec from a config mapping (lists become tuples)."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ShapesError(f"unknown transfer set keys {extra}; known: {sorted(known)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the spec and the generator version."""
        blob = json.dumps({"generator": "shapes_transfer", "spec": self.to_dict(),
                           "generator_version": TRANSFER_GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flat_background(rng: np.random.Generator, size: int, feature: float) -> np.ndarray:
    """One random colour at the renderer's supersampled resolution, ``[4 size, 4 size, 3]``."""
    n = size * 4
    return np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (n, n, 3)).copy()


def render_transfer_image(spec: TransferSetSpec, split: str, index: int) -> tuple[np.ndarray, str]:
    """Image ``index`` of ``split`` and its class name."""
    rng = np.random.default_rng([spec.seed % 2**64, _KIND_TRANSFER, SPLITS.index(split), index])
    s = spec.image_size
    cls = spec.classes[index % len(spec.classes)]
    placed = _place(rng, s, [], 1, spec.scale[0] * s, spec.scale[1] * s, 1.0)
    extra = int(rng.integers(0, spec.distractors + 1))
    placed = _place(rng, s, placed, extra, 0.07 * s, 0.12 * s, max(1.0, 0.04 * s))
    ids = [CLASSES.index(cls), *rng.integers(0, len(CLASSES), len(placed) - 1)]
    objects = [(int(c), *p) for c, p in zip(ids, placed, strict=True)]
    bg = _flat_background if spec.background == "flat" else _background
    return _render(rng, s, s / 6, objects, background=bg).image, cls


def _write(root: Path, spec: TransferSetSpec) -> None:
    """The ImageFolder tree and the manifest (last) into the empty directory ``root``."""
    counts = {}
    for split, per_class in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for name in spec.classes:
            (root / "imagefolder" / split / name).mkdir(parents=True)
        total = per_class * len(spec.classes)
        for i in range(total):
            image, cls = render_transfer_image(spec, split, i)
            Image.fromarray(image).save(root / "imagefolder" / split / cls / f"{split}_{i:06d}.png")
        counts[split] = total
    manifest = {"generator": "shapes_transfer", "generator_version": TRANSFER_GENERATOR_VERSION,
                "fingerprint": spec.fingerprint(), "spec": spec.to_dict(), "counts": counts,
                "complete": True}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _complete(root: Path, spec: TransferSetSpec) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and m.get("fingerprint") == spec.fingerprint()


def ensure_transfer_set(spec: TransferSetSpec, cache_root: str | Path | None = None) -> Path:
    """The ImageFolder root of ``spec`` (``<cache>/shapes-transfer-<fingerprint>/imagefolder``),
    generated once into a temporary sibling and renamed into place (a concurrent caller that
    loses the rename uses the winner's copy).

    Args:
        spec: The set.
        cache_root: Parent directory (default ``$MIMBENCH_CACHE/data``).
    """
    parent = Path(cache_root).expanduser() if cache_root else default_cache_root()
    final = parent / f"shapes-transfer-{spec.fingerprint()}"
    if not _complete(final, spec):
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        try:
            _write(tmp, spec)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not _complete(final, spec):
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final / "imagefolder"
