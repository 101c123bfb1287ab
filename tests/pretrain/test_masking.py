"""Mask generators: exact counts, alignment to the masked-patch size, statistics over draws."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.config import MaskingConfig
from pretrain.masking import MASKERS, create_masker, mask_to_indices


@pytest.mark.parametrize(
    "grid,patch,mps,ratio",
    [((14, 14), 16, 32, 0.6), ((12, 12), 16, 32, 0.6), ((8, 8), 4, 8, 0.5), ((8, 8), 4, 4, 0.3)],
)
def test_random_unit_masking_counts_and_alignment(grid, patch, mps, ratio):
    m = create_masker(MaskingConfig(strategy="random", ratio=ratio, mask_patch_size=mps), grid, patch)
    g = torch.Generator().manual_seed(0)
    mask = m(64, generator=g)
    scale = mps // patch
    units = (grid[0] // scale) * (grid[1] // scale)
    expected = math.ceil(units * ratio) * scale * scale  # SimMIM: ceil(token_count * ratio)
    assert mask.dtype == torch.bool and mask.shape == (64, grid[0] * grid[1])
    assert (mask.sum(1) == expected).all()
    # every scale x scale block of patches is all-masked or all-visible
    blocks = mask.view(64, grid[0] // scale, scale, grid[1] // scale, scale)
    per_block = blocks.sum(dim=(2, 4))
    assert ((per_block == 0) | (per_block == scale * scale)).all()


def test_random_masking_is_uniform_over_units():
    m = create_masker(MaskingConfig(strategy="random", ratio=0.5, mask_patch_size=8), (8, 8), 4)
    mask = m(4000, generator=torch.Generator().manual_seed(1)).float()
    freq = mask.mean(0)  # every position is masked with probability 0.5
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.05)


def test_shuffle_masking_counts_and_uniformity():
    m = create_masker(MaskingConfig(strategy="shuffle", ratio=0.75, mask_patch_size=None), (14, 14), 16)
    mask = m(2000, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 196 - int(196 * 0.25)).all()  # MAE: len_keep = int(L * (1 - r))
    freq = mask.float().mean(0)
    assert (freq - 0.75).abs().max() < 0.05
    assert m.num_masked == 147


def test_masks_differ_between_samples_and_follow_the_generator():
    m = create_masker(MaskingConfig(strategy="shuffle", ratio=0.75), (8, 8), 4)
    a = m(8, generator=torch.Generator().manual_seed(3))
    b = m(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 8


def test_mask_patch_size_must_align():
    with pytest.raises(ValueError, match="multiple of the model patch size"):
        create_masker(MaskingConfig(strategy="random", ratio=0.6, mask_patch_size=24), (14, 14), 16)
    with pytest.raises(ValueError, match="does not tile"):
        create_masker(MaskingConfig(strategy="random", ratio=0.6, mask_patch_size=32), (7, 7), 16)


def test_unknown_strategy_suggests():
    with pytest.raises(KeyError, match="did you mean 'shuffle'"):
        MASKERS.get("shufle")


def test_mask_to_indices_round_trip():
    m = create_masker(MaskingConfig(strategy="shuffle", ratio=0.75), (8, 8), 4)
    mask = m(5, generator=torch.Generator().manual_seed(0))
    ids_keep, ids_restore = mask_to_indices(mask)
    assert ids_keep.shape == (5, 16)
    assert not torch.gather(mask, 1, ids_keep).any()  # kept ids are the visible ones
    tokens = torch.arange(64).expand(5, -1)
    shuffled = torch.cat([torch.gather(tokens, 1, ids_keep), tokens.new_full((5, 48), -1)], 1)
    restored = torch.gather(shuffled, 1, ids_restore)
    assert torch.equal(restored[~mask], tokens[~mask])
    assert (restored[mask] == -1).all()


def test_mask_to_indices_rejects_unequal_counts():
    mask = torch.tensor([[True, False, False], [True, True, False]])
    with pytest.raises(ValueError, match="same number of visible"):
        mask_to_indices(mask)
