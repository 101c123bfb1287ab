"""SimMIM's prediction resolution (Table 3), channel-wise colour bins at any resolution (Table 13)
and iGPT's colour clusters (Table 5), each against a hand or brute-force computation, plus a few
optimizer steps of every new axis value on a micro Swin."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.config import (
    ConfigError,
    EncoderConfig,
    LossConfig,
    RecipeConfig,
    TargetConfig,
    to_plain,
    validate_config,
)
from pretrain.color_clusters import ColorClustersTarget
from pretrain.model import MIMModel
from pretrain.targets import ColorBinsTarget, PixelTarget, from_unit, to_unit

P, G = 4, (8, 8)  # a 32 px input in 4 px patches: the micro Swin's grid


def _imgs(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _block_mean(img: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    """Mean over a ``size x size`` block per channel, ``[C]`` (by hand, no pooling op)."""
    total = torch.zeros(img.shape[0], dtype=torch.float64)
    for y in range(top, top + size):
        for x in range(left, left + size):
            total += img[:, y, x].double()
    return total / (size * size)


def test_pixel_target_above_the_patch_grid_is_each_patch_of_block_means():
    imgs = _imgs()
    t = PixelTarget(TargetConfig(resolution=16), P, G)  # 2x2 target pixels per patch
    assert (t.pred_grid, t.cell, t.out_dim, t.pixel_channels) == ((8, 8), 2, 12, None)
    value = t(imgs).value  # [B, 64, 12]
    for b in range(2):
        for i, j in [(0, 0), (3, 5), (7, 7)]:
            row = value[b, i * 8 + j].view(2, 2, 3)  # channels last inside a patch
            for u in range(2):
                for v in range(2):
                    hand = _block_mean(imgs[b], 4 * i + 2 * u, 4 * j + 2 * v, 2)
                    torch.testing.assert_close(row[u, v].double(), hand, atol=1e-6, rtol=0)


def test_pixel_target_below_the_patch_grid_is_one_block_mean_per_cell():
    imgs = _imgs()
    t = PixelTarget(TargetConfig(resolution=4), P, G)  # one target pixel per 2x2 patches
    assert (t.pred_grid, t.cell, t.out_dim) == ((4, 4), 1, 3)
    value = t(imgs).value  # [B, 16, 3]
    assert value.shape == (2, 16, 3)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                hand = _block_mean(imgs[b], 8 * i, 8 * j, 8)
                torch.testing.assert_close(value[b, i * 4 + j].double(), hand, atol=1e-6, rtol=0)


def test_default_resolution_is_the_input_unchanged():
    imgs = _imgs()
    t = PixelTarget(TargetConfig(), P, G)
    assert (t.resolution, t.pred_grid, t.cell, t.out_dim, t.pixel_channels) == (32, G, 4, 48, 3)
    assert torch.equal(t.to_image(t(imgs).value), imgs)


def test_loss_region_on_a_coarse_grid_weighs_cells_by_their_masked_fraction():
    torch.manual_seed(0)
    t = PixelTarget(TargetConfig(resolution=4), P, G)
    mask = torch.rand(2, 64) < 0.5  # patch mask
    weights = t.cell_mask(mask)  # [2, 16]
    for b in range(2):
        for i in range(4):
            for j in range(4):
                patches = [mask[b, (2 * i + di) * 8 + 2 * j + dj] for di in (0, 1) for dj in (0, 1)]
                assert float(weights[b, i * 4 + j]) == pytest.approx(sum(map(float, patches)) / 4)
    tgt = t(_imgs())
    pred = torch.randn_like(tgt.value)
    err = (pred - tgt.value).abs().mean(-1)  # [2, 16] l1 per cell
    hand = float((err * weights).sum() / weights.sum())
    got = float(t.loss(pred, tgt, mask, LossConfig(type="l1")))
    assert got == pytest.approx(hand, rel=1e-6)
    whole = float(t.loss(pred, tgt, mask, LossConfig(type="l1", on="all")))
    assert whole == pytest.approx(float(err.mean()), rel=1e-6)


def test_color_bins_at_a_lower_resolution_bin_the_block_means():
    imgs = from_unit(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)))
    t = ColorBinsTarget(TargetConfig(type="color_bins", bins=4, resolution=8), P, G)
    assert (t.pred_grid, t.cell, t.out_dim) == ((8, 8), 1, 3 * 4)
    value = t(imgs).value  # [B, 64, 3]
    unit = to_unit(imgs)
    for b in range(2):
        for i in range(8):
            for j in range(8):
                mean = _block_mean(unit[b], 4 * i, 4 * j, 4)
                hand = [min(3, int(math.floor(float(m) * 4))) for m in mean]
                assert value[b, i * 8 + j].tolist() == hand


def test_color_bins_by_hand_on_known_colors():
    unit = torch.tensor([0.0, 0.24, 0.26, 0.999, 1.0]).view(1, 1, 1, 5).expand(1, 3, 5, 5)
    t = ColorBinsTarget(TargetConfig(type="color_bins", bins=4), patch_size=5, grid=(1, 1))
    got = t(from_unit(unit.contiguous())).value.view(5, 5, 3)[0, :, 0]  # first row, red
    assert got.tolist() == [0, 0, 1, 3, 3]  # floor(v * 4), the top edge in the last bin


def test_color_clusters_assign_each_pixel_to_its_nearest_centroid_by_brute_force():
    imgs = from_unit(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    t = ColorClustersTarget(TargetConfig(type="color_clusters", clusters=7, resolution=16), P, G)
    t.palette.copy_(torch.rand(7, 3, generator=torch.Generator().manual_seed(2)))
    value = t(imgs).value  # [B, 64, 4]: 2x2 target pixels per patch
    assert value.shape == (3, 64, 4) and t.out_dim == 4 * 7
    pix = to_unit(torch.nn.functional.avg_pool2d(imgs, 2))  # [B, 3, 16, 16]
    for b in range(3):
        for y in range(16):
            for x in range(16):
                d = [sum((float(pix[b, c, y, x]) - float(t.palette[k, c])) ** 2 for c in range(3))
                     for k in range(7)]
                i, j, u, v = y // 2, x // 2, y % 2, x % 2
                assert int(value[b, i * 8 + j, u * 2 + v]) == min(range(7), key=d.__getitem__)


def test_color_clusters_fit_a_palette_on_training_pixels_and_keep_it_in_the_state():
    imgs = from_unit(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    cfg = TargetConfig(type="color_clusters", clusters=8, resolution=8,
                       tokenizer={"type": "kmeans", "train_images": 4, "kmeans_iters": 5})
    t = ColorClustersTarget(cfg, P, G)
    logs: list[str] = []
    t.prepare(lambda n: imgs[:n], logs.append)
    assert bool(t.fitted) and "8 RGB clusters over 256 pixels at 8^2" in logs[0]
    pix = to_unit(torch.nn.functional.avg_pool2d(imgs, 4)).permute(0, 2, 3, 1).reshape(-1, 3)
    assert pix.min() >= 0 and pix.max() <= 1
    assert (t.palette >= 0).all() and (t.palette <= 1).all()
    # every palette colour is the mean of the pixels assigned to it (Lloyd's fixed point after
    # the last assignment is within one step): the fitted error beats a random palette's
    fitted = ((pix[:, None] - t.palette[None]) ** 2).sum(-1).min(1).values.mean()
    rand = torch.rand(8, 3, generator=torch.Generator().manual_seed(4))
    assert fitted < ((pix[:, None] - rand[None]) ** 2).sum(-1).min(1).values.mean()
    other = ColorClustersTarget(cfg, P, G)
    other.load_state_dict(t.state_dict())  # the palette travels with the checkpoint
    assert bool(other.fitted) and torch.equal(other.palette, t.palette)
    other.prepare(lambda n: (_ for _ in ()).throw(AssertionError("refitted")), logs.append)


# --------------------------------------------------------------------------- validation


def _pretrain(recipe: dict, arch: str = "swin_micro_32") -> dict:
    masking = {"mask_patch_size": 8, "min_block_patches": 4}
    return {"encoder": {"arch": arch}, "recipe": {"name": "simmim", "masking": masking, **recipe}}


@pytest.mark.parametrize(
    "raw, match",
    [
        (_pretrain({"target": {"resolution": 12}}),
         r"recipe\.target\.resolution 12 does not divide the input size 32"),
        (_pretrain({"target": {"resolution": 64}}),
         r"target\.resolution 64 does not divide the input size 32"),
        (_pretrain({"target": {"resolution": 1}}),
         r"target\.resolution 1 with head 'linear'.*1x1 target grid is not a whole multiple of "
         r"the encoder's 2x2 output grid"),
        (_pretrain({"target": {"resolution": 4}, "head": {"type": "inverse_swin", "dim": 64,
                                                          "num_heads": 4, "window_size": 4,
                                                          "stage_depths": [1, 1, 1]}}),
         r"inverse_swin upsamples by powers of 2|stage"),
        (_pretrain({"name": "mae", "target": {"resolution": 4}, "masking": {}}, arch="vit_tiny_32"),
         r"target\.resolution 4 with head 'mae_decoder'.*8x8 patch grid only, not on a 4x4"),
        (_pretrain({"target": {"type": "hog", "resolution": 8}, "loss": {"type": "l2"}}),
         r"target\.resolution applies to .*color_bins.*; target 'hog' predicts on the patch "
         r"grid: remove target\.resolution"),
    ],
)
def test_resolutions_the_input_or_the_head_cannot_produce_are_refused(raw, match):
    if "inverse_swin" in str(raw):  # validation passes (the factor is checked at build time)
        cfg = validate_config(raw, kind="pretrain")
        with pytest.raises(ValueError, match=match):
            MIMModel(cfg.encoder, cfg.recipe)
        return
    with pytest.raises(ConfigError, match=match):
        validate_config(raw, kind="pretrain")


def test_new_target_keys_stay_out_of_dumps_at_their_defaults():
    plain = to_plain(RecipeConfig(name="simmim"))
    assert "resolution" not in plain["target"] and "clusters" not in plain["target"]
    plain = to_plain(RecipeConfig(name="simmim", target={"resolution": 48}))
    assert plain["target"]["resolution"] == 48 and "clusters" not in plain["target"]
    given = RecipeConfig(name="simmim", target={"type": "color_clusters", "clusters": 16},
                         loss={"type": "cross_entropy"})
    assert to_plain(given)["target"]["clusters"] == 16


# --------------------------------------------------------------------------- training steps


def _fit_steps(recipe: dict, steps: int = 8) -> list[float]:
    enc = EncoderConfig(arch="swin_micro_32")
    model = MIMModel(enc, RecipeConfig(name="simmim", masking={"mask_patch_size": 8}, **recipe))
    torch.manual_seed(0)
    imgs = from_unit(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    model.prepare(lambda n: imgs[:n], lambda m: None)
    mask = model.masker(4, torch.Generator().manual_seed(6))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    losses = []
    for _ in range(steps):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        n = out.pred.shape[1]
        assert n == math.prod(model.target.pred_grid) == out.target.shape[1]
    rows = model.visualize(imgs, out)
    assert all(img.shape == (4, 3, 32, 32) for _, img in rows)
    return losses


@pytest.mark.parametrize(
    "recipe",
    [
        {"target": {"resolution": r}} for r in (2, 4, 8, 16, 32)
    ] + [
        {"target": {"type": "color_bins", "bins": b, "resolution": r},
         "loss": {"type": "cross_entropy"}} for b, r in ((2, 2), (8, 8), (256, 16))
    ] + [
        {"target": {"type": "color_clusters", "clusters": 16, "resolution": 8,
                    "tokenizer": {"type": "kmeans", "train_images": 4, "kmeans_iters": 3}},
         "loss": {"type": "cross_entropy"}},
        {"target": {"resolution": 4}, "loss": {"type": "l1", "on": "all"},
         "head": {"type": "mlp", "dim": 32}},
    ],
    ids=lambda r: str(r["target"]).replace(" ", ""),
)
def test_each_new_axis_value_trains_on_a_fixed_batch(recipe):
    losses = _fit_steps(recipe)
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses
