"""``mimbench viz masks`` and the benchmark script's timing functions (on micro encoders)."""

from __future__ import annotations

import torch
from PIL import Image

from harness.cli import main
from pretrain import bench
from pretrain.masking import MASKERS
from pretrain.viz import drawn_strategies, mask_rows, render_masks


def test_viz_masks_cli_writes_one_row_per_strategy(tmp_path, capsys):
    out = tmp_path / "masks.png"
    assert main(["viz", "masks", "--out", str(out), "--samples", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        # one row per strategy but the causal ones (raster masks every token: nothing to draw)
        assert len(drawn_strategies()) == len(MASKERS) - 1
        assert im.width > 3 * 14 * 6 and im.height > len(drawn_strategies()) * 14 * 6


def test_viz_masks_unknown_strategy_suggests(tmp_path, capsys):
    assert main(["viz", "masks", "--out", str(tmp_path / "m.png"), "--strategy", "blok"]) == 2
    assert "did you mean 'block'" in capsys.readouterr().err


def test_mask_rows_use_the_papers_settings_and_draw_masked_dark():
    rows = dict(mask_rows(arch="vit_base_16", samples=2, seed=0))
    assert set(rows) == {
        "bernoulli 29/196",  # iGPT's BERT mask: round(0.15 * 196) expected, drawn per token
        "block 75/196",
        "capi_inverse_block 127/196",  # round(0.65 * 196) = round(127.4)
        "central 49/196",
        "d2v2_inverse_block 157/196",  # 196 - int(0.2 * 196)
        "grid 147/196",
        "ibot_block 59/196",  # round(0.3 * 196) = round(58.8)
        "multiblock 39/196",
        "random 120/196",
        "random_blocks 49/196",
        "random_region 49/196",
        "shuffle 147/196",
    }
    masks = rows["central 49/196"]
    img = render_masks([("central", masks)], cell=4, label_w=0)
    px = torch.tensor(list(img.getdata())).view(img.height, img.width, 3)
    assert px[6 + 7 * 4 + 2, 7 * 4 + 2].sum() < px[6 + 2, 2].sum()  # centre dark, corner light


def test_mask_rows_on_a_small_image_fall_back_to_the_model_patch(tmp_path):
    """SimMIM's 32 px unit is the whole 32 px image of vit_micro_32 (every patch masked): the
    picture draws its masks on the 8 px model patches instead of failing or masking all."""
    rows = dict(mask_rows(arch="vit_micro_32", strategies=["random"], samples=2, seed=0))
    assert list(rows) == ["random 10/16"]  # ceil(0.6 x 16) of the 4x4 patches
    assert rows["random 10/16"].sum(dim=(1, 2)).tolist() == [10, 10]
    out = tmp_path / "m.png"
    assert main(["viz", "masks", "--arch", "vit_micro_32", "--out", str(out)]) == 0
    assert out.is_file()


def test_bench_times_a_recipe_and_the_mae_modes(monkeypatch, tmp_path):
    # 16 px units on the 32 px micro ViT (SimMIM's 32 px would be one unit: every patch masked)
    micro = {"name": "simmim", "masking": {"mask_patch_size": 16}}
    monkeypatch.setitem(bench.BENCH_RECIPES, "micro", ("vit_micro_32", micro))
    res = bench.time_recipe(
        "micro", batch=2, steps=1, device=torch.device("cpu"), tmp=str(tmp_path)
    )
    assert res["step_s"] > 0 and res["peak_mb"] > 0 and res["trainable_params_m"] > 0
    # the MAE comparison on a micro ViT: both modes run and the ratios are reported
    out = bench.time_mae_modes(
        batch=2,
        steps=1,
        device=torch.device("cpu"),
        arch="vit_micro_32",
        head={"depth": 1, "dim": 32, "num_heads": 2},
    )
    assert set(out) >= {"visible", "mask_token", "speedup_step", "speedup_encoder"}
    assert out["speedup_step"] > 0 and out["visible"]["encoder_s"] > 0


def test_recon_grid_labels_each_row():
    from pretrain.viz import recon_row_labels, render_recon_grid

    names = ["original", "masked", "prediction", "pasted"]
    assert recon_row_labels(names) == ["original", "masked", "prediction", "prediction + visible"]
    rows = [(name, torch.full((3, 3, 8, 8), 0.5)) for name in names]  # [B, 3, H, W] grey
    img = render_recon_grid(rows, scale=2, label_w=130, pad=1)
    px = torch.tensor(list(img.getdata())).view(img.height, img.width, 3)
    assert img.width == 130 + 3 * (16 + 1) + 1 and img.height == 4 * (16 + 1) + 1
    for r in range(4):  # text pixels in the label column of every row band
        band = px[1 + r * 17: 1 + r * 17 + 16, :130]
        assert (band.sum(-1) < 200).any(), f"row {r} has no label"
    # the longest label is drawn wider than the shortest
    widths = [int((px[1 + r * 17: 1 + r * 17 + 16, :130].sum(-1) < 200).any(0).nonzero().max())
              for r in range(4)]
    assert widths[3] > widths[1]
    assert px[1 + 8, 130 + 1 + 8].tolist() == [128, 128, 128]  # the first tile: the image
