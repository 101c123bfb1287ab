"""Feature extraction's seeded views (:class:`downstream.features._ViewDataset`)."""

from __future__ import annotations

import random

import torch
from torchvision import transforms

from downstream.features import _ViewDataset
from harness.core.data.datasets import CheckedImageFolder


def _augment() -> transforms.Compose:
    """Draws from torch's RNG (crop, flip) and Python's ``random`` (the lambda)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(8, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Lambda(lambda x: x + random.random()),
    ])  # fmt: skip


def test_augmented_views_are_those_torch_manual_seed_gives(tiny_imagefolder):
    """View v of sample i: the transform under ``torch.manual_seed(s)`` and ``random.seed(s)``,
    s = (seed * 1_000_003 + v * 100_003 + i) mod (2**63 - 1), as before the CPU-only seeding;
    the global RNG states are left as they were."""
    base = CheckedImageFolder(str(tiny_imagefolder / "train"))
    tf = _augment()
    ds = _ViewDataset(base, tf, seed=5, view=2)
    torch.manual_seed(123)
    random.seed(7)
    before = torch.get_rng_state(), random.getstate()
    got = [ds[i] for i in range(len(base))]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    for i, (img, label) in enumerate(got):
        s = (5 * 1_000_003 + 2 * 100_003 + i) % (2**63 - 1)
        torch.manual_seed(s)
        random.seed(s)
        want = tf(base.loader(base.samples[i][0]))
        assert label == base.samples[i][1] and torch.equal(img, want)
    assert not torch.equal(got[0][0], _ViewDataset(base, tf, seed=6, view=2)[0][0])
