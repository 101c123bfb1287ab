"""Shared fixtures: small ImageFolder datasets made on the fly, torch threads for 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


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
