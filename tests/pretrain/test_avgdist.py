"""AvgDist (SimMIM Sec. 4.1.2): both distance transforms against a brute-force minimum over
every visible pixel, hand values (one masked pixel, a central square), the Monte-Carlo estimate
against the brute force on the same masks, its standard error, and where it is shown."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.core.config import ConfigError, MaskingConfig
from pretrain.avgdist import (
    AvgDist,
    exact_edt,
    mask_avgdist,
    masking_avgdist,
    pixel_mask,
)
from pretrain.masking import create_masker


def _brute_distances(masked: np.ndarray) -> np.ndarray:
    """Per masked pixel (row-major), the minimum Euclidean distance over all visible pixels."""
    vis = np.argwhere(~masked).astype(float)  # [V, 2]
    hid = np.argwhere(masked).astype(float)  # [M, 2]
    return np.sqrt(((hid[:, None, :] - vis[None, :, :]) ** 2).sum(-1)).min(1)


def _random_masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(1, 14, size=2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        if m.any() and not m.all():
            yield m


def test_exact_edt_equals_the_brute_force_minimum():
    for m in _random_masks(60):
        assert np.allclose(exact_edt(m)[m], _brute_distances(m))
        assert (exact_edt(m)[~m] == 0).all()


def test_mask_avgdist_equals_the_brute_force_mean():
    for m in _random_masks(60, seed=1):
        assert mask_avgdist(m) == pytest.approx(_brute_distances(m).mean(), rel=1e-12)


def test_a_single_masked_pixel_is_one_pixel_away():
    for pos in [(0, 0), (2, 3), (4, 4)]:
        m = np.zeros((5, 5), bool)
        m[pos] = True
        assert mask_avgdist(m) == 1.0


def _square_by_hand(s: int) -> float:
    """A masked s x s square surrounded by visible pixels: the pixels of ring r (r = 1 on the
    border) are r away, and ring r holds (s - 2r + 2)^2 - max(s - 2r, 0)^2 pixels."""
    rings = range(1, (s + 1) // 2 + 1)
    return sum(r * ((s - 2 * r + 2) ** 2 - max(s - 2 * r, 0) ** 2) for r in rings) / s**2


@pytest.mark.parametrize(("s", "hand"), [(1, 1.0), (2, 1.0), (3, 10 / 9), (4, 1.25), (5, 1.4)])
def test_a_central_square_has_the_hand_value(s, hand):
    assert _square_by_hand(s) == pytest.approx(hand)
    m = np.zeros((s + 6, s + 6), bool)
    m[3 : 3 + s, 3 : 3 + s] = True
    assert mask_avgdist(m) == pytest.approx(hand)
    assert exact_edt(m)[m].mean() == pytest.approx(hand)


def test_the_central_masker_gives_the_hand_value_with_no_error():
    # 32 px image, 4 px patches: a centered box of round(sqrt(0.25) x 8) = 4 patches = 16 px
    avg = masking_avgdist(MaskingConfig(strategy="central", ratio=0.25), 32, 4, draws=3)
    assert avg.mean == pytest.approx(_square_by_hand(16)) and avg.stderr == 0.0
    assert avg.draws == 3 and avg.img_px == 32


def test_the_estimate_is_the_mean_over_the_maskers_own_masks():
    cfg = MaskingConfig(strategy="random", ratio=0.6, mask_patch_size=8)
    avg = masking_avgdist(cfg, 32, 4, draws=20, seed=3)
    masks = create_masker(cfg, (8, 8), 4)(20, generator=torch.Generator().manual_seed(3))
    per = [_brute_distances(pixel_mask(m.view(8, 8), 4)).mean() for m in masks]
    assert avg.mean == pytest.approx(float(np.mean(per)))
    assert avg.stderr == pytest.approx(float(np.std(per, ddof=1) / math.sqrt(20)))


def test_the_standard_error_shrinks_with_draws():
    cfg = MaskingConfig(strategy="shuffle", ratio=0.75)
    few = masking_avgdist(cfg, 32, 4, draws=16)
    many = masking_avgdist(cfg, 32, 4, draws=400)
    assert many.stderr < few.stderr / 2.5  # ~1/sqrt(25) = 1/5 in expectation
    assert abs(many.mean - few.mean) < 4 * few.stderr


def test_larger_units_are_farther_from_the_visible_pixels():
    means = [masking_avgdist(MaskingConfig(strategy="random", ratio=0.6, mask_patch_size=u),
                             64, 4, draws=16).mean for u in (4, 8, 16)]
    assert means == sorted(means) and means[0] >= 1.0


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="draws must be >= 1"):
        masking_avgdist(MaskingConfig(), 32, 4, draws=0)
    with pytest.raises(ValueError, match="masked and one visible"):
        mask_avgdist(np.ones((3, 3), bool))


def test_text_and_dict():
    a = AvgDist(14.414, 0.021, 256, 192)
    assert a.text() == "AvgDist 14.41 +- 0.02 px (256 masks, 192 px image)"
    assert a.to_dict() == {"mean": 14.414, "stderr": 0.021, "draws": 256, "img_px": 192}


def test_viz_masks_prints_each_strategys_avgdist(tmp_path, capsys):
    from harness.cli import main

    assert main(["viz", "masks", "--out", str(tmp_path / "m.png"), "--arch", "vit_micro_32",
                 "--strategy", "central", "--samples", "1", "--avgdist-draws", "2"]) == 0
    out = capsys.readouterr().out
    hand = _square_by_hand(16)  # vit_micro_32: 32 px, 8 px patches; a 2 x 2-patch centre
    assert f"central: AvgDist {hand:.2f} +- 0.00 px (2 masks, 32 px image)" in out


def test_validate_prints_a_pretraining_configs_avgdist(capsys):
    from harness.cli import main
    from harness.core.config import load_config
    from pretrain.avgdist import encoder_avgdist

    path = "configs/pretrain/context_encoder_tiny.yaml"
    assert main(["validate", path]) == 0
    cfg = load_config(path)
    want = encoder_avgdist(cfg.recipe.masking, cfg.encoder).text()
    assert capsys.readouterr().out.rstrip().endswith(f"# {want} (SimMIM Fig. 3)")


def test_masks_without_a_masked_pixel_are_left_out_and_counted():
    """iBOT masks only a share of the images (mask_prob): the unmasked draws have no distance;
    AvgDist is the mean over the others (brute force on the same masks), and says how many."""
    cfg = MaskingConfig(strategy="ibot_block", ratio=0.3, ratio_var=0.1, mask_prob=0.5,
                        min_block_patches=2)  # fmt: skip
    avg = masking_avgdist(cfg, 32, 4, draws=40, seed=1)
    masks = create_masker(cfg, (8, 8), 4)(40, generator=torch.Generator().manual_seed(1))
    pix = [pixel_mask(m.view(8, 8), 4) for m in masks]
    usable = [p for p in pix if p.any() and not p.all()]
    assert avg.draws == len(usable) and avg.left_out == 40 - len(usable) > 0
    assert avg.mean == pytest.approx(float(np.mean([_brute_distances(p).mean() for p in usable])))
    assert "left out" in avg.text() and avg.to_dict()["left_out"] == avg.left_out
    never = MaskingConfig(strategy="ibot_block", ratio=0.3, mask_prob=1e-9, min_block_patches=2)
    with pytest.raises(ConfigError, match="none of 5 masks"):
        masking_avgdist(never, 32, 4, draws=5)
