"""data2vec 2.0 (pretrain/data2vec2.py, the ``d2v2_inverse_block`` masker, clones sharing one
teacher pass, the class-token loss): mask statistics against a brute-force expectation, the
decoder and the loss against hand computations, clones against the same batch repeated, the
loss going down on a fixed batch, validation, and exact resume with the teacher."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.core.config import (
    ConfigError,
    EncoderConfig,
    LossConfig,
    MaskingConfig,
    PretrainConfig,
    RecipeConfig,
    to_plain,
)
from pretrain.data2vec2 import ConvDecoder
from pretrain.engine import param_groups, pretrain
from pretrain.masking import create_masker
from pretrain.model import MIMModel
from pretrain.targets import TargetOut

ENC = EncoderConfig(arch="vit_micro_32")  # 2 blocks, width 32, 4x4 patches of 8 px
D2V2 = {"name": "data2vec2", "clone_batch": 3, "masking": {"ratio": 0.5, "block_length": 2},
        "head": {"depth": 2, "dim": 32, "groups": 4}, "target": {"latent": {"top_k": 2}}}  # fmt: skip


def _model(**recipe) -> MIMModel:
    torch.manual_seed(0)
    return MIMModel(ENC, RecipeConfig(**{**D2V2, **recipe}))


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[:, :, 8:24, 8:24] += 1.0  # some structure
    return (x - 0.5) / 0.5


# --------------------------------------------------------------------------- masking


def _expected_coverage(side: int, length: int, centres: int) -> float:
    """Brute force: the expected number of units covered by ``centres`` uniform centres, each
    covering the square ``[c - length // 2, c - length // 2 + length)`` clamped to the grid."""
    n = side * side
    hits = np.zeros((side, side))
    for r in range(side):
        for c in range(side):
            rows = {min(max(r + i - length // 2, 0), side - 1) for i in range(length)}
            cols = {min(max(c + j - length // 2, 0), side - 1) for j in range(length)}
            for y in rows:
                for x in cols:
                    hits[y, x] += 1
    return float((1.0 - (1.0 - hits / n) ** centres).sum())


def test_inverse_block_masks_meet_the_references_statistics():
    cfg = MaskingConfig(strategy="d2v2_inverse_block", ratio=0.8, block_length=3, ratio_adjust=0.07)
    masker = create_masker(cfg, (14, 14), 16)  # ViT-B/16 at 224 px
    # the reference's numbers: int(196 x 0.2) = 39 visible, int(196 x 0.27 / 9) = 5 centres
    assert masker.num_masked == 196 - 39 and masker.centres == 5
    mask = masker(400, generator=torch.Generator().manual_seed(0))  # [400, 196]
    assert bool((mask.sum(1) == 157).all())
    assert len({tuple(m.tolist()) for m in mask}) == 400  # every draw its own
    # before the count is made exact: the union of the squares, as a brute-force expectation
    rng = random.Random(0)
    covered = [int(masker._squares(rng).sum()) for _ in range(3000)]
    expected = _expected_coverage(14, 3, 5)
    sem = float(np.std(covered)) / math.sqrt(len(covered))
    assert abs(float(np.mean(covered)) - expected) < 4 * sem, (np.mean(covered), expected)
    # every position is about equally likely to stay visible (no corner favoured)
    freq = (~mask).float().mean(0).view(14, 14)
    assert abs(float(freq.mean()) - 39 / 196) < 1e-6
    assert float(freq[:7].mean() - freq[7:].mean()).__abs__() < 0.03


def test_inverse_block_squares_are_whole_blocks_of_the_length():
    cfg = MaskingConfig(strategy="d2v2_inverse_block", ratio=0.9, block_length=3)
    masker = create_masker(cfg, (14, 14), 16)
    assert masker.centres == int(196 * (1 - 0.9) / 9)  # ratio_adjust 0 by default
    rng = random.Random(3)
    for _ in range(50):
        vis = masker._squares(rng)
        # each visible unit lies in a fully visible square around some centre (clamped to
        # the border as the reference clamps its indices)
        for r, c in np.argwhere(vis):
            ok = False
            for y in range(max(r - 1, 0), min(r + 2, 14)):
                for x in range(max(c - 1, 0), min(c + 2, 14)):
                    rows = np.clip(np.arange(y - 1, y + 2), 0, 13)
                    cols = np.clip(np.arange(x - 1, x + 2), 0, 13)
                    ok = ok or bool(vis[np.ix_(rows, cols)].all())
            assert ok, (r, c)


# --------------------------------------------------------------------------- decoder and loss


def test_decoder_fills_the_grid_and_equals_a_hand_computation():
    torch.manual_seed(0)
    model = _model(head={"depth": 1, "dim": 32, "groups": 4, "mask_noise": 0.0})
    dec = model.head
    assert isinstance(dec, ConvDecoder)
    mask = torch.tensor([[False, True] * 8])  # [1, 16]: even positions visible
    ids_keep = torch.arange(0, 16, 2).unsqueeze(0)
    ids_restore = torch.argsort(torch.argsort(mask.to(torch.int8), dim=1, stable=True), dim=1)
    vis = torch.randn(1, 1 + 8, 32)  # class token + 8 visible tokens
    grid = dec.fill(vis[:, 1:], ids_restore)
    want = torch.zeros(1, 16, 32)
    want[0, ids_keep[0]] = vis[0, 1:]
    assert torch.equal(grid, want)
    out = dec(vis, mask, ids_restore)  # [1, 16, 32]
    x = want.transpose(1, 2).reshape(1, 32, 4, 4)
    conv = dec.blocks[0].conv
    y = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=4)
    mu, var = y.mean(1, keepdim=True), y.var(1, unbiased=False, keepdim=True)
    y = F.gelu((y - mu) / torch.sqrt(var + 1e-5)) + x  # residual: widths match
    ref = y.flatten(2).transpose(1, 2) @ dec.proj.weight.T + dec.proj.bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_loss_and_class_token_loss_equal_a_hand_computation():
    model = _model(target={"latent": {"top_k": 2, "cls_weight": 0.5}})
    cfg = LossConfig(type="l2", patch_reduce="sum_rsqrt_dim")
    # one image, two patches, D = 4 (the target's width is the encoder's; only shapes matter)
    t = TargetOut(torch.tensor([[[1.0, 1, 1, 1], [3, 3, 3, 3]]]))
    pred = torch.tensor([[[0.0, 0, 0, 0], [3, 3, 3, 1]]])
    both, first = torch.tensor([[True, True]]), torch.tensor([[True, False]])
    # patch 0: 4 x 1^2 / sqrt(4) = 2; patch 1: 2^2 / 2 = 2
    assert float(model.target.loss(pred, t, both, cfg)) == pytest.approx(2.0)
    assert float(model.target.loss(pred, t, first, cfg)) == pytest.approx(2.0)
    # class token [2, 2, 2, 0] vs the mean target [2, 2, 2, 2]: 2^2 / 2 = 2, x 0.5 x 1 image
    tokens = torch.tensor([[[2.0, 2, 2, 0], [9, 9, 9, 9]]])
    assert float(model.target.prefix_loss(tokens, t, cfg)) == pytest.approx(1.0)
    two = TargetOut(t.value.repeat(2, 1, 1))  # summed over the images: twice
    assert float(model.target.prefix_loss(tokens.repeat(2, 1, 1), two, cfg)) == pytest.approx(2.0)
    off = _model(target={"latent": {"top_k": 2, "cls_weight": 0.0}})
    assert off.target.prefix_loss(tokens, t, cfg) is None


# --------------------------------------------------------------------------- clones


def test_clones_share_one_teacher_pass_and_get_their_own_masks(monkeypatch):
    model = _model()
    calls: list[int] = []
    blocks = model.target.teacher.encoder.forward_blocks

    def counted(imgs, *a, **k):
        calls.append(imgs.shape[0])
        return blocks(imgs, *a, **k)

    monkeypatch.setattr(model.target.teacher.encoder, "forward_blocks", counted)
    imgs = _images(2)
    mask = model.masker(2, generator=torch.Generator().manual_seed(0))  # [2, 3, 16]
    assert mask.shape == (2, 3, 16)
    torch.manual_seed(5)
    out = model(imgs, mask)
    assert calls == [2]  # once, on the 2 images, not on their 6 clones
    assert out.pred.shape == (6, 16, 32) and out.mask.shape == (6, 16)
    for b in range(2):  # the clones of an image: different masks, one target
        assert len({tuple(m.tolist()) for m in mask[b]}) == 3
        assert torch.equal(out.target[3 * b], out.target[3 * b + 2])
    # the same as no clones on the batch repeated (teacher once per repeated image)
    plain = _model(clone_batch=1)
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(5)  # the same decoder noise
    ref = plain(imgs.repeat_interleave(3, 0), mask.flatten(0, 1))
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.parts["cls"], ref.parts["cls"])
    rows = model.visualize(imgs, out)  # each image's first clone
    assert [r[0] for r in rows] == ["original", "masked"] and rows[1][1].shape == imgs.shape


def test_data2vec2_loss_goes_down_on_a_fixed_batch():
    model = _model()
    imgs = _images(4)
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    losses = []
    for step in range(1, 9):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_step(step)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(out.parts) == {"rec", "cls"} and {"target_std", "cosine"} <= set(out.stats)


# --------------------------------------------------------------------------- config


def test_recipe_file_holds_the_references_values():
    r = RecipeConfig(name="data2vec2")
    assert (r.masking.strategy, r.masking.ratio, r.masking.block_length, r.masking.ratio_adjust) == (
        "d2v2_inverse_block", 0.8, 3, 0.07)
    assert (r.head.type, r.head.depth, r.head.dim, r.head.kernel_size, r.head.groups) == (
        "conv_decoder", 6, 768, 3, 16)
    lat = r.target.latent
    assert (lat.top_k, lat.block_norm, lat.target_norm, lat.cls_weight) == (10, "instance", "layer", 0.01)
    assert (r.loss.type, r.loss.patch_reduce, r.clone_batch, r.encoder_mode) == (
        "l2", "sum_rsqrt_dim", 16, "visible")
    t = r.teacher
    assert t is not None
    assert (t.momentum, t.momentum_end, t.momentum_steps, t.schedule) == (0.9998, 0.99999, 100000, "linear")


def test_new_keys_are_left_out_of_dumps_at_their_defaults():
    for name in ("mae", "data2vec", "capi"):
        plain = to_plain(RecipeConfig(name=name))
        assert "clone_batch" not in plain
        assert not {"block_length", "ratio_adjust"} & set(plain["masking"])
        assert not {"kernel_size", "groups", "mask_noise"} & set(plain["head"])
        assert "cls_weight" not in plain["target"].get("latent", {})
    d2v2 = to_plain(RecipeConfig(name="data2vec2"))
    assert d2v2["clone_batch"] == 16 and d2v2["target"]["latent"]["cls_weight"] == 0.01
    assert d2v2["masking"]["ratio_adjust"] == 0.07 and d2v2["head"]["groups"] == 16


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"name": "ibot", "clone_batch": 2},
         "clone_batch 2 .*global_crops 2 .*set clone_batch: 1 or global_crops: 1"),
        ({"head": {"kernel_size": 4}}, "head.kernel_size 4 is even.*use 3 or 5"),
        ({"masking": {"block_length": 1}}, "block_length"),
    ],
)
def test_impossible_combinations_fail_at_validation(recipe, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(**{**D2V2, **recipe})


def test_conv_groups_that_do_not_divide_the_encoder_fail_at_validation():
    rec = {**D2V2, "head": {"depth": 1, "dim": 30, "groups": 5}}
    with pytest.raises(ValueError, match=r"recipe: head.groups 5 does not divide the encoder's "
                       r"width 32.*\(encoder 'vit_micro_32'\)"):
        PretrainConfig(encoder=ENC, recipe=rec)


def test_impossible_combinations_fail_when_the_model_is_built():
    with pytest.raises(ValueError, match="head.groups 5 does not divide the encoder's width 32"):
        _model(head={"depth": 1, "dim": 30, "groups": 5})
    with pytest.raises(ValueError, match="head.groups 3 does not divide the encoder's width 32.*"
                       "common divisor of 32 and 24"):
        _model(head={"depth": 1, "dim": 24, "groups": 3})
    with pytest.raises(ValueError, match="top_k 10 averages the teacher's last 10 blocks, but "
                       "the vit encoder has 2 blocks"):
        MIMModel(ENC, RecipeConfig(name="data2vec2"))
    with pytest.raises(ConfigError, match="every patch of every sample is masked"):
        create_masker(MaskingConfig(strategy="d2v2_inverse_block", ratio=0.99), (4, 4), 8)


# --------------------------------------------------------------------------- engine


def _cfg(data, steps, **train):
    return PretrainConfig(
        data={"source": str(data)}, encoder={"arch": "vit_micro_32"}, recipe=D2V2,
        train={"epochs": 10, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4,
               "max_steps": steps, "num_recon_images": 2, "ckpt_every_steps": 2, **train},
    )  # fmt: skip


@pytest.mark.slow
def test_resume_is_bitwise_with_a_teacher_and_clones(tiny_imagefolder, tmp_path):
    cfg = _cfg(tiny_imagefolder, 4, log_every_steps=1)
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)

    class Interrupt(Exception):
        pass

    def killer(msg: str) -> None:
        if "step 3/" in msg:  # after the step-2 checkpoint
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "cut", log=killer)
    resumed = pretrain(cfg, tmp_path / "cut", log=lambda m: None)

    def state(path):
        return torch.load(path / "checkpoint.pth", weights_only=False)["model"]

    a, b = state(full.out_dir), state(resumed.out_dir)
    assert any(k.startswith("target.teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ((p / "loss.jsonl").read_text() for p in (full.out_dir, resumed.out_dir))
    assert la == lb  # losses (with the class-token part) and target statistics, bitwise
    hist = [json.loads(line) for line in la.splitlines()]
    assert all({"target_std", "cosine"} <= set(h) for h in hist)
    assert full.recon_path is not None and full.recon_path.is_file()


def test_bench_times_clones_views_and_the_teachers_share(monkeypatch, tmp_path):
    from pretrain import bench

    ibot = {"name": "ibot", "local_crops": 2, "local_crop_size": 16,  # two 16 px local crops
            "target": {"ibot": {"out_dim": 64, "patch_out_dim": 64,
                                "hidden_dim": 32, "bottleneck_dim": 16}}}  # fmt: skip
    monkeypatch.setitem(bench.BENCH_RECIPES, "d2v2_micro", ("vit_micro_32", D2V2))
    monkeypatch.setitem(bench.BENCH_RECIPES, "ibot_micro", ("vit_micro_32", ibot))
    for label in ("d2v2_micro", "ibot_micro"):  # clones [B, C, L] masks; views [B, V, ...] images
        res = bench.time_recipe(label, batch=2, steps=1, device=torch.device("cpu"), tmp=str(tmp_path))
        assert res["step_s"] > 0 and res["target_s"] > 0 and res["peak_mb"] > 0
