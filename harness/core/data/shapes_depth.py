"""Depth maps for the synthetic "shapes" scenes, written in NYU-Depth v2's layout.

The scenes are :func:`harness.core.data.shapes.render_scene`'s (the same RGB pixels the ADE20K
and COCO copies hold); each gets a depth map drawn from its own generator
``np.random.default_rng([seed, 2, split_id, index])``:

* the background is a tilted plane (a floor seen from above): depth falls linearly from
  ``far`` (top row, drawn in [6, 9] m) to ``near`` (bottom row, drawn in [1.5, 3] m);
* each shape is a fronto-parallel disc at depth ``0.4 * scene_size / r`` m (r its circumradius
  in px, so between 2 and 5 m for the renderer's radii): larger shapes are nearer, and a probe
  can read depth from appearance and position alone.

Layout (the NYU-Depth v2 split-file layout of BTS, Lee et al. 2019, and of the Monocular Depth
Estimation Toolbox that DINOv2's depth evaluation uses, ``depth/datasets/nyu.py``: a root with
``nyu_train.txt`` / ``nyu_test.txt``, one ``<rgb> <depth> <focal>`` line per image, paths
relative to the root, depth as 16-bit PNG in millimetres, ``depth_scale`` 1000)::

    <root>/nyu_train.txt, nyu_test.txt
    <root>/train/rgb_00000.jpg, train/sync_depth_00000.png, ...
    <root>/test/rgb_00000.jpg, test/sync_depth_00000.png, ...
    <root>/manifest.json

:func:`ensure_shapes_depth` generates into ``$MIMBENCH_CACHE/data/shapes-depth-<key>``, keyed by
the spec and :data:`DEPTH_VERSION` (its own key: changing the depth model never touches the
shapes cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import GENERATOR_VERSION, Scene, ShapesSpec, default_cache_root, render_scene

DEPTH_VERSION: int = 1
#: The split files of the layout, by our split name.
NYU_SPLIT_FILES: dict[str, str] = {"train": "nyu_train.txt", "val": "nyu_test.txt"}
NYU_FOCAL = 518.8579  # the focal column of the NYU split files (unused by the probe)
DEPTH_SCALE = 1000.0  # PNG value per metre (millimetres)
_KIND_DEPTH = 2
_DIRS = {"train": "train", "val": "test"}


def depth_fingerprint(spec: ShapesSpec) -> str:
    """Short sha256 of the spec, the shapes generator version and :data:`DEPTH_VERSION`."""
    blob = json.dumps({"spec": spec.to_dict(), "generator_version": GENERATOR_VERSION,
                       "depth_version": DEPTH_VERSION}, sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scene_depth(spec: ShapesSpec, split: str, index: int, scene: Scene) -> np.ndarray:
    """``[H, W]`` float32 depth in metres of scene ``index`` of ``split`` (module docstring)."""
    rng = np.random.default_rng([spec.seed % 2**64, _KIND_DEPTH, ("train", "val").index(split),
                                 index])  # fmt: skip
    h, w = scene.image.shape[:2]
    far, near = rng.uniform(6.0, 9.0), rng.uniform(1.5, 3.0)
    rows = (np.arange(h, dtype=np.float32) + 0.5) / h  # [H]
    depth = np.repeat((far + (near - far) * rows)[:, None], w, axis=1).astype(np.float32)
    for inst in scene.instances:
        r = float(np.linalg.norm(inst.polygon - inst.polygon.mean(axis=0), axis=1).max())
        depth[inst.mask] = 0.4 * spec.scene_size / max(r, 1.0)
    return depth


def write_nyu_depth(root: Path, spec: ShapesSpec) -> dict[str, int]:
    """Write the depth dataset of ``spec``'s scenes into the new directory ``root``."""
    counts = {}
    for split, n in (("train", spec.train_scenes), ("val", spec.val_scenes)):
        d = _DIRS[split]
        (root / d).mkdir(parents=True)
        lines = []
        for i in range(n):
            scene = render_scene(spec, split, i)
            buf = io.BytesIO()
            Image.fromarray(scene.image).save(buf, format="JPEG", quality=95, subsampling=0)
            (root / d / f"rgb_{i:05d}.jpg").write_bytes(buf.getvalue())
            mm = np.clip(np.rint(scene_depth(spec, split, i, scene) * DEPTH_SCALE), 0, 65535)
            Image.fromarray(mm.astype(np.uint16)).save(root / d / f"sync_depth_{i:05d}.png")
            lines.append(f"{d}/rgb_{i:05d}.jpg {d}/sync_depth_{i:05d}.png {NYU_FOCAL}")
        (root / NYU_SPLIT_FILES[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split] = n
    manifest = {"generator": "shapes-depth", "depth_version": DEPTH_VERSION,
                "generator_version": GENERATOR_VERSION, "fingerprint": depth_fingerprint(spec),
                "spec": spec.to_dict(), "counts": counts, "depth_scale": DEPTH_SCALE,
                "complete": True}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")  # fmt: skip
    return counts


def _complete(root: Path, spec: ShapesSpec) -> bool:
    try:
        m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and m.get("fingerprint") == depth_fingerprint(spec)


def ensure_shapes_depth(spec: ShapesSpec = ShapesSpec(), cache_root: str | Path | None = None) -> Path:
    """Return ``cache_root/shapes-depth-<key>`` (NYU layout), generating it if needed.

    Generated into a temporary sibling and renamed into place (a concurrent caller that loses
    the race uses the winner's copy).
    """
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    final = root / f"shapes-depth-{depth_fingerprint(spec)}"
    if _complete(final, spec):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        write_nyu_depth(tmp / "d", spec)
        os.rename(tmp / "d", final)
    except OSError:
        if not _complete(final, spec):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
