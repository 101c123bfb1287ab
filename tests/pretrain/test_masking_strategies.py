"""BEiT's block-wise, the Context Encoder's and MAE's grid masks: exact counts, bounds, statistics."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from harness.core.config import MaskingConfig
from pretrain.masking import MASKERS, BlockMasker, create_masker

NEW = ["block", "central", "random_blocks", "random_region", "grid"]


def _components(m: np.ndarray) -> int:
    """Number of 4-connected components of the True cells."""
    seen = np.zeros_like(m)
    count = 0
    for r, c in np.argwhere(m):
        if seen[r, c]:
            continue
        count += 1
        stack = [(r, c)]
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < m.shape[0] and 0 <= xx < m.shape[1] and m[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return count


def test_every_strategy_is_registered():
    # I-JEPA, iBOT, CAPI, data2vec 2.0, iGPT: their own tests
    others = {"multiblock", "ibot_block", "capi_inverse_block", "d2v2_inverse_block",
              "bernoulli", "raster"}
    assert set(MASKERS.names()) == {"random", "shuffle", *NEW, *others}


GRIDS = [((14, 14), 16, None), ((8, 8), 4, 8), ((12, 12), 4, 16)]
# grid masking needs an even unit grid: (12, 12) patches in 16 px units are 3 x 3 units (rejected,
# see test_grid_rejects_ratios_it_cannot_make), so the grid strategy takes 8 px units (6 x 6) there.
CASES = [(s, *g) for s in NEW for g in GRIDS if s != "grid"] + [
    ("grid", (14, 14), 16, None), ("grid", (8, 8), 4, 8), ("grid", (12, 12), 4, 8)
]


@pytest.mark.parametrize("strategy,grid,patch,mps", CASES)
def test_exact_counts_and_unit_alignment(strategy, grid, patch, mps):
    ratio = 0.75 if strategy == "grid" else 0.4
    cfg = MaskingConfig(strategy=strategy, ratio=ratio, mask_patch_size=mps, min_block_patches=2)
    m = create_masker(cfg, grid, patch)
    mask = m(200, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (200, grid[0] * grid[1])
    assert (mask.sum(1) == m.num_masked).all()
    s = (mps or patch) // patch
    blocks = mask.view(200, grid[0] // s, s, grid[1] // s, s).sum(dim=(2, 4))
    assert ((blocks == 0) | (blocks == s * s)).all()  # whole masking units only
    units = (grid[0] // s) * (grid[1] // s)
    if strategy in ("block", "random_blocks", "random_region"):
        assert m.units_masked == round(ratio * units)


def test_block_masking_follows_beit_algorithm_bounds():
    # BEiT's setting: 14x14 patches, 75 masked, blocks >= 16 patches, aspect in [0.3, 1/0.3]
    m = create_masker(
        MaskingConfig(strategy="block", ratio=75 / 196, min_block_patches=16), (14, 14), 16
    )
    assert isinstance(m, BlockMasker) and m.units_masked == 75
    rng = random.Random(0)
    grown, n_blocks = [], []
    for _ in range(300):
        mask = m.sample_units(rng)
        assert mask.sum() == 75
        union = np.zeros_like(mask)
        for top, left, h, w, area, aspect in m.last_blocks:
            assert 0.3 - 1e-9 <= aspect <= 1 / 0.3 + 1e-9
            assert h == round(math.sqrt(area * aspect)) and w == round(math.sqrt(area / aspect))
            assert h < 14 and w < 14  # BEiT: strictly inside the grid
            assert top + h <= 14 and left + w <= 14
            union[top : top + h, left : left + w] = True
        # the first block's target area is drawn from [16, 75]
        assert 16 <= m.last_blocks[0][4] <= 75
        # the mask is the union of the rectangles plus the units grown to reach the count
        assert (union <= mask).all() and mask.sum() - union.sum() == m.last_grown
        grown.append(m.last_grown)
        n_blocks.append(len(m.last_blocks))
    assert np.mean(grown) < 0.1 * 75  # BEiT's loop does nearly all the work
    assert 1 < np.mean(n_blocks) < 10


def test_block_masking_spreads_over_the_image():
    m = create_masker(MaskingConfig(strategy="block", ratio=0.4), (14, 14), 16)
    freq = m(3000, generator=torch.Generator().manual_seed(2)).float().mean(0).view(14, 14)
    assert abs(freq.mean().item() - m.num_masked / 196) < 1e-6
    # every patch gets masked sometimes, none always (BEiT's placement favours the centre)
    assert freq.min() > 0.02 and freq.max() < 0.8
    assert freq[5:9, 5:9].mean() > freq[0].mean()


def test_central_square_is_the_same_centered_box():
    m = create_masker(MaskingConfig(strategy="central", ratio=0.25), (16, 16), 8)
    mask = m(3, generator=torch.Generator().manual_seed(0)).view(3, 16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 4:12] = True  # Context Encoder: the central 64x64 of a 128x128 image
    assert all(torch.equal(mask[i], expected) for i in range(3))


def test_random_region_is_one_connected_region():
    m = create_masker(MaskingConfig(strategy="random_region", ratio=0.25), (16, 16), 8)
    mask = m(50, generator=torch.Generator().manual_seed(1)).view(50, 16, 16).numpy()
    assert all(_components(x) == 1 for x in mask)
    assert len({x.tobytes() for x in mask}) == 50


def test_random_blocks_are_rectangles_within_bounds():
    cfg = MaskingConfig(
        strategy="random_blocks", ratio=0.25, min_block_patches=4, max_block_patches=16
    )
    m = create_masker(cfg, (16, 16), 8)
    mask = m(100, generator=torch.Generator().manual_seed(0)).view(100, 16, 16).numpy()
    assert (mask.sum((1, 2)) == 64).all()
    comps = [_components(x) for x in mask]
    assert np.mean(comps) > 2  # several smaller blocks, not one region


def test_random_blocks_sizes_and_aspect_ratios_stay_in_bounds():
    cfg = MaskingConfig(
        strategy="random_blocks", ratio=0.25, min_block_patches=4, max_block_patches=16
    )
    m = create_masker(cfg, (16, 16), 8)
    rng = random.Random(0)
    areas, aspects = [], []
    for _ in range(300):
        mask = m.sample_units(rng)
        assert mask.sum() == 64 and len(m.last_blocks) >= 4  # 64 units in blocks of <= 16
        union = np.zeros_like(mask)
        for i, (top, left, h, w, area, aspect) in enumerate(m.last_blocks):
            assert 4 <= area <= 16 and 0.3 - 1e-9 <= aspect <= 1 / 0.3 + 1e-9
            assert h == max(1, round(math.sqrt(area * aspect)))
            assert w == max(1, round(math.sqrt(area / aspect)))
            assert top + h <= 16 and left + w <= 16
            box = np.zeros_like(mask)
            box[top : top + h, left : left + w] = True
            if i < len(m.last_blocks) - 1:  # every block but the last (cut to the count) is whole
                assert (box <= mask).all()
            union |= box
            areas.append(area)
            aspects.append(math.log(aspect))
        assert (mask <= union).all()  # nothing masked outside the drawn rectangles
    # areas uniform on [4, 16], log-aspects uniform on [log 0.3, -log 0.3]
    assert abs(np.mean(areas) - 10) < 0.5 and abs(np.mean(aspects)) < 0.1
    assert np.std(aspects) > 0.6  # uniform on +-1.2: std 0.70


def test_grid_keeps_one_unit_per_cell_at_a_random_offset():
    m = create_masker(MaskingConfig(strategy="grid", ratio=0.75), (14, 14), 16)
    mask = m(400, generator=torch.Generator().manual_seed(0)).view(400, 7, 2, 7, 2)
    assert (mask.sum(dim=(2, 4)) == 3).all()  # one visible patch in every 2x2 cell
    visible = (~mask).permute(0, 1, 3, 2, 4).reshape(400, 49, 4)
    offsets = visible.float().argmax(-1)
    assert (offsets == offsets[:, :1]).all()  # the same offset over the image
    counts = torch.bincount(offsets[:, 0], minlength=4).float() / 400
    assert (counts - 0.25).abs().max() < 0.08


def test_grid_rejects_ratios_it_cannot_make():
    with pytest.raises(ValueError, match="1 - 1/k"):
        create_masker(MaskingConfig(strategy="grid", ratio=0.6), (14, 14), 16)
    with pytest.raises(ValueError, match="divisible"):
        create_masker(MaskingConfig(strategy="grid", ratio=0.75), (7, 7), 16)


@pytest.mark.parametrize("strategy", NEW)
def test_masks_follow_the_generator(strategy):
    cfg = MaskingConfig(strategy=strategy, ratio=0.75, min_block_patches=2)
    m = create_masker(cfg, (8, 8), 4)
    a = m(6, generator=torch.Generator().manual_seed(5))
    b = m(6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    if strategy != "central":
        c = m(6, generator=torch.Generator().manual_seed(6))
        assert not torch.equal(a, c)
