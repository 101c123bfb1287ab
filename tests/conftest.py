"""Shared fixtures: small ImageFolder datasets made on the fly, torch threads for 2 cores; the
``mm`` marker skips (saying why) where the OpenMMLab stack is not installed, ``gpu`` where no
CUDA device is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import downstream  # noqa: F401  (registers the tasks, as the CLI does, for tests that validate suites)

torch.set_num_threads(2)


def _openmmlab_missing() -> str | None:
    """What of the OpenMMLab stack is not importable (None: all of it is)."""
    missing = [m for m in ("mmcv", "mmengine", "mmdet", "mmseg") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``mm`` tests without OpenMMLab and ``gpu`` tests without CUDA, naming the cause
    (``bash scripts/setup.sh`` installs the OpenMMLab stack; CI runs every mm test)."""
    missing = _openmmlab_missing()
    for item in items:
        if missing and "mm" in item.keywords:
            item.add_marker(pytest.mark.skip(
                reason=f"OpenMMLab not installed ({missing}): run bash scripts/setup.sh"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Write train/ and val/ splits of class-dependent colored squares with noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
                lo, hi = size // 4, 3 * size // 4
                img[lo:hi, lo:hi, c % 3] = 200 + rng.integers(0, 55)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data")


# Two optimizer steps at batch 4 with a picture at the end: the pretraining run the tests use
# when they check what the engine builds or feeds, not what it learns.
TWO_STEP_TRAIN = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4, "max_steps": 2,
                  "log_every_steps": 1, "num_recon_images": 2}  # fmt: skip
