"""Selfie (pretrain/selfie.py) and context prediction (pretrain/context_prediction.py): draws
checked over many samples, losses on hand-computed cases, learning on a fixed batch, pictures,
bad input refused at validation, and the engine exporting the encoder."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.config import EncoderConfig, PairsConfig, PretrainConfig, RecipeConfig
from harness.core.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from pretrain.context_prediction import (
    GREEN_MAGENTA,
    KEEP1,
    LABEL,
    NEIGHBOURS,
    X1,
    X2,
    Y1,
    Y2,
    ContextPredictionModel,
    PairSampler,
    crop,
    drop_colors,
    project_colors,
)
from pretrain.encoders import load_encoder
from pretrain.engine import ENCODER, param_groups, pretrain
from pretrain.model import MIMOutput, create_model
from pretrain.selfie import SelfieModel, masked_order, selfie_loss
from pretrain.targets import from_unit, to_unit

ARCH = "ce_conv_32"  # 32 px images, 3 stride-2 convs: the tiny CPU encoder
SELFIE = {"name": "selfie", "head": {"depth": 1, "dim": 32, "num_heads": 2}}
PAIRS = {"patch_size": 8, "gap": 3, "jitter": 1}
CONTEXT = {"name": "context_prediction", "head": {"dim": 32}, "pairs": PAIRS}


def _model(rec: dict) -> SelfieModel | ContextPredictionModel:
    torch.manual_seed(0)
    return create_model(EncoderConfig(arch=ARCH), RecipeConfig(**rec))  # type: ignore[return-value]


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, 0, : size // 2] += 1.0  # red top half, green-ish left half: position is visible
    x[:, 1, :, : size // 2] += 1.0
    return (x / 2 - 0.5) / 0.25


# --------------------------------------------------------------------------- Selfie


def test_selfie_masks_whole_patches_with_the_same_count_uniformly():
    model = _model(SELFIE)
    assert isinstance(model, SelfieModel)
    assert (model.unit, model.unit_grid, model.num_masked) == (8, (4, 4), 4)  # paper: 8 px, 16
    n = 4000
    mask = model.masker(n, generator=torch.Generator().manual_seed(1))  # [n, 64] on 4 px patches
    units = model.units(mask)  # [n, 16]
    assert (units.sum(1) == 4).all()
    # every masked 8 px unit is its 2x2 block of 4 px patches, nothing else is masked
    back = units.view(n, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(n, 64)
    assert torch.equal(back, mask.bool())
    freq = units.float().mean(0)  # each unit masked with probability 4 / 16
    sd = math.sqrt(0.25 * 0.75 / n)
    assert (freq - 0.25).abs().max() < 5 * sd


def test_masked_order_lists_locations_in_order():
    units = torch.tensor([[False, True, False, True, True], [True, False, True, False, True]])
    masked, visible = masked_order(units, 3)
    assert masked.tolist() == [[1, 3, 4], [0, 2, 4]]
    assert visible.tolist() == [[0, 2], [1, 3]]


def test_selfie_loss_on_a_hand_computed_case():
    scores = torch.tensor([[[2.0, 0.0], [1.0, 3.0]], [[0.0, 0.0], [4.0, -1.0]]])
    # query i's right candidate is i: -log softmax(row i)[i], averaged over the 4 queries
    expect = (
        math.log(math.exp(2) + 1) - 2
        + math.log(math.exp(1) + math.exp(3)) - 3
        + math.log(2.0)
        + math.log(math.exp(4) + math.exp(-1)) + 1
    ) / 4
    assert selfie_loss(scores).item() == pytest.approx(expect, rel=1e-6)


def test_selfie_scores_match_a_per_image_loop():
    model = _model(SELFIE)
    model.eval()
    imgs = _images(3)
    mask = model.masker(3, generator=torch.Generator().manual_seed(2))
    out = model(imgs, mask)
    head, units = model.head, model.units(mask)
    with torch.no_grad():
        for b in range(3):
            # the patch network on each 8 px patch alone, averaged over its output map
            emb = []
            for r in range(4):
                for c in range(4):
                    patch = imgs[b : b + 1, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
                    emb.append(model.encoder.forward_features(patch).mean(1)[0])
            e = head.embed(torch.stack(emb))  # [16, D]
            pos = torch.stack([head.row[i // 4] + head.col[i % 4] for i in range(16)])
            vis = [i for i in range(16) if not units[b, i]]
            msk = [i for i in range(16) if units[b, i]]
            seq = torch.cat([head.u0[0], torch.stack([e[i] + pos[i] for i in vis])])
            u = head.norm(head.blocks(seq[None])[0, 0])
            expect = torch.stack([torch.stack([(u + pos[i]) @ e[j] for j in msk]) for i in msk])
            assert torch.allclose(out.pred[b], expect, atol=1e-4), b
    assert out.loss.item() == pytest.approx(selfie_loss(out.pred).item())


def test_selfie_learns_on_a_fixed_batch_and_draws_the_chosen_patches():
    model = _model(SELFIE)
    imgs = _images(8)
    mask = model.masker(8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert max(losses[-3:]) < 0.5 * losses[0], losses
    rows = model.visualize(imgs, out)
    assert [r[0] for r in rows] == ["original", "masked", "chosen"]
    for _, img in rows:
        assert img.shape == imgs.shape and img.min() >= 0 and img.max() <= 1


def test_selfie_picture_places_the_chosen_patch():
    model = _model(SELFIE)
    imgs = _images(2)
    mask = model.masker(2, generator=torch.Generator().manual_seed(3))
    orig = to_unit(imgs)
    right = torch.eye(4).expand(2, 4, 4) * 10  # every query picks its own patch
    out = MIMOutput(torch.zeros(()), right, torch.zeros(2, 4), mask)
    assert torch.allclose(model.chosen_image(orig, out), orig)  # the truth, no red frame
    swapped = right[:, [1, 0, 2, 3]]  # queries 0 and 1 pick each other's patch
    img = model.chosen_image(orig, MIMOutput(torch.zeros(()), swapped, torch.zeros(2, 4), mask))
    masked, _ = masked_order(model.units(mask), 4)
    b, first, second = 0, int(masked[0, 0]), int(masked[0, 1])
    (r0, c0), (r1, c1) = divmod(first, 4), divmod(second, 4)
    got = img[b, :, 8 * r0 + 1 : 8 * r0 + 7, 8 * c0 + 1 : 8 * c0 + 7]  # inside the red frame
    assert torch.allclose(got, orig[b, :, 8 * r1 + 1 : 8 * r1 + 7, 8 * c1 + 1 : 8 * c1 + 7])
    assert torch.equal(img[b, :, 8 * r0, 8 * c0], torch.tensor([1.0, 0.0, 0.0]))  # framed red


# --------------------------------------------------------------------------- context prediction


@pytest.mark.parametrize("size,pairs", [(32, PAIRS), (48, {"patch_size": 8, "gap": 4, "jitter": 3})])
def test_pairs_are_uniform_inside_the_image_with_bounded_jitter(size, pairs):
    cfg = PairsConfig(**pairs)
    p, step, j = cfg.patch_size, cfg.patch_size + cfg.gap, cfg.jitter
    n = 16000
    rows = PairSampler(cfg, size)(n, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (n, 7) and rows.dtype == torch.long
    label = rows[:, LABEL]
    counts = torch.bincount(label, minlength=8).float()
    sd = math.sqrt(n * (1 / 8) * (7 / 8))
    assert (counts - n / 8).abs().max() < 5 * sd, counts  # the 8 positions uniform
    for y, x in ((Y1, X1), (Y2, X2)):  # patches inside the image
        assert rows[:, y].min() >= 0 and rows[:, x].min() >= 0
        assert (rows[:, y] + p).max() <= size and (rows[:, x] + p).max() <= size
    # second - first = the neighbour's offset plus the difference of two jitters in [-j, j]
    offset = torch.tensor(NEIGHBOURS)[label] * step
    rest = rows[:, [Y2, X2]] - rows[:, [Y1, X1]] - offset
    assert rest.abs().max() <= 2 * j
    assert set(rest.flatten().tolist()) == set(range(-2 * j, 2 * j + 1))  # every value drawn
    assert rest.float().mean().abs() < 0.05
    # the gap left between the patches along the direction of the pair, after jitter
    dy, dx = offset[:, 0], offset[:, 1]
    gap_y = torch.where(dy != 0, (rows[:, Y2] - rows[:, Y1]).abs() - p, torch.full_like(dy, cfg.gap))
    gap_x = torch.where(dx != 0, (rows[:, X2] - rows[:, X1]).abs() - p, torch.full_like(dx, cfg.gap))
    assert torch.maximum(gap_y, gap_x).min() >= cfg.gap - 2 * j
    assert set(rows[:, KEEP1].tolist()) == {0, 1, 2}
    # the first (centre) patch's corner: origin in [j, S - span - j], plus step, plus [-j, j]
    span = 3 * p + 2 * cfg.gap
    for col in (Y1, X1):
        assert (rows[:, col].min(), rows[:, col].max()) == (step, size - span + step)


def test_crop_cuts_the_patch_at_each_corner():
    imgs = torch.arange(2 * 3 * 10 * 10, dtype=torch.float).view(2, 3, 10, 10)
    corners = torch.tensor([[1, 2], [5, 0]])
    out = crop(imgs, corners, 4)
    assert torch.equal(out[0], imgs[0, :, 1:5, 2:6]) and torch.equal(out[1], imgs[1, :, 5:9, 0:4])


def test_colour_dropping_keeps_one_channel_and_fills_the_others_with_small_noise():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(64, 3, 16, 16, generator=g) * 2.0
    keep = torch.randint(0, 3, (64,), generator=g)
    out = drop_colors(patches, keep, 0.01, generator=g)
    for i in range(64):
        k = int(keep[i])
        assert torch.equal(out[i, k], patches[i, k])
        others = out[i, [c for c in range(3) if c != k]]
        ratio = others.std() / patches[i, k].std()
        assert 0.007 < ratio < 0.013  # 1 / 100 of the kept channel's std
        assert others.mean().abs() < 0.01 * patches[i, k].std()


def test_colour_projection_removes_green_magenta_and_keeps_grey():
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(4, 3, 6, 6, generator=g)
    unit[0] = 0.3  # a grey patch
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = project_colors(from_unit(unit)) * std + mean  # back to RGB, unclamped
    a = torch.tensor(GREEN_MAGENTA).view(1, 3, 1, 1)
    assert (out * a).sum(1).abs().max() < 1e-5  # nothing left along the axis
    assert torch.allclose(out[0], unit[0], atol=1e-5)  # grey unchanged
    # what remains is the pixel less its green-magenta component (hand formula per pixel)
    r, gch, b = unit[1, :, 2, 3].tolist()
    t = (-r + 2 * gch - b) / 6
    assert torch.allclose(out[1, :, 2, 3], torch.tensor([r + t, gch - 2 * t, b + t]), atol=1e-5)


def test_context_loss_on_a_hand_computed_case(monkeypatch):
    model = _model(CONTEXT)
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0, 0, 3.0]])
    monkeypatch.setattr(model, "logits", lambda imgs, pairs: logits)
    pairs = torch.zeros(2, 7, dtype=torch.long)
    pairs[:, LABEL] = torch.tensor([0, 3])
    out = model(_images(2), pairs)
    expect = ((math.log(math.exp(2) + 7) - 2) + (math.log(math.exp(1) + math.exp(3) + 6) - 1)) / 2
    assert out.loss.item() == pytest.approx(expect, rel=1e-6)
    assert out.parts["acc"].item() == 0.5  # the first pair right, the second wrong


@pytest.mark.parametrize("color", ["drop", "project", "none"])
def test_context_prediction_learns_on_a_fixed_batch_and_draws_pairs(color):
    model = _model({**CONTEXT, "pairs": {**PAIRS, "color": color}})
    assert isinstance(model, ContextPredictionModel)
    imgs = _images(8)
    pairs = model.masker(8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    losses = []
    for _ in range(20):  # the reference head's two hidden layers: ~0.51 of the start at 15 steps
        out = model(imgs, pairs)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    rows = model.visualize(imgs, out)
    assert [r[0] for r in rows] == ["original", "true", "predicted"]
    for _, img in rows:
        assert img.shape == imgs.shape and img.min() >= 0 and img.max() <= 1


def test_context_picture_puts_the_second_patch_in_its_cell():
    model = _model({**CONTEXT, "pairs": {**PAIRS, "color": "none"}})
    imgs = _images(1)
    pairs = torch.tensor([[4, 12, 12, 12, 23, 0, 0]])  # label 4: right of the first patch
    first, second = model.patches(imgs, pairs)
    logits = torch.zeros(1, 1, 8)
    logits[0, 0, 6] = 1.0  # predicted below (wrong)
    out = MIMOutput(torch.zeros(()), logits, pairs[:, :1], pairs)
    rows = dict(model.visualize(imgs, out))
    cell = 32 // 3
    y0 = cell + (cell - 8) // 2
    inner = slice(1, 7)
    got = rows["true"][0, :, y0 + 1 : y0 + 7, y0 + cell + 1 : y0 + cell + 7]
    assert torch.allclose(got, to_unit(second)[0, :, inner, inner])
    got = rows["predicted"][0, :, y0 + cell + 1 : y0 + cell + 7, y0 + 1 : y0 + 7]
    assert torch.allclose(got, to_unit(second)[0, :, inner, inner])
    assert torch.equal(rows["predicted"][0, :, y0 + cell, y0], torch.tensor([1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------- bad input


def test_a_grid_larger_than_the_image_is_refused_with_the_smallest_size():
    with pytest.raises(ValueError) as err:
        PretrainConfig(encoder={"arch": ARCH}, recipe={"name": "context_prediction"})
    msg = str(err.value)
    for part in ("96 px patches", "gap 48", "jitter 7", "at least 398 px", "takes 32 px"):
        assert part in msg, msg
    PretrainConfig(encoder={"arch": ARCH}, recipe=CONTEXT)  # fits: 3*8 + 2*3 + 2*1 = 32


@pytest.mark.parametrize(
    "rec,arch,match",
    [
        ({"name": "selfie", "masking": {"mask_patch_size": 16}}, "vit_micro_32", "convolutional"),
        ({**CONTEXT, "pairs": {**PAIRS, "patch_size": 6, "gap": 4}}, ARCH, "multiple of 8"),
        ({"name": "selfie", "pairs": PAIRS}, ARCH, "does not use patch pairs"),
        ({"name": "context_prediction", "pairs": None}, ARCH, "set recipe.pairs"),
    ],
)
def test_lineage_misconfigurations_fail_at_validation(rec, arch, match):
    with pytest.raises(ValueError, match=match):
        PretrainConfig(encoder={"arch": arch}, recipe=rec)


def test_pairs_stay_out_of_other_recipes_dumps():
    from harness.core.config import to_plain

    plain = to_plain(PretrainConfig(encoder={"arch": "vit_micro_32"}, recipe={"name": "mae"}))
    assert "pairs" not in plain["recipe"]  # hashes of configs without pairs unchanged
    plain = to_plain(PretrainConfig(encoder={"arch": ARCH}, recipe=CONTEXT))
    assert plain["recipe"]["pairs"]["patch_size"] == 8


# --------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("rec", [SELFIE, CONTEXT], ids=["selfie", "context_prediction"])
def test_engine_pretrains_and_exports_the_conv_encoder(tiny_imagefolder, tmp_path, rec):
    train = {
        "epochs": 1,
        "warmup_epochs": 0,
        "batch_size": 4,
        "base_lr": 1e-3,
        "lr_base_batch": 4,
        "max_steps": 2,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "num_recon_images": 3,
    }
    cfg = PretrainConfig(
        data={"source": str(tiny_imagefolder)}, encoder={"arch": ARCH}, recipe=rec, train=train
    )
    res = pretrain(cfg, tmp_path / "run", log=lambda m: None)
    assert res.steps == 2 and res.recon_path.is_file()
    enc = load_encoder(tmp_path / "run" / ENCODER)
    feats = enc.forward_features(torch.zeros(1, 3, 32, 32))  # the whole image, as tasks use it
    assert feats.shape == (1, 16, 64)


def test_the_conv_encoder_has_a_feature_cache_fingerprint():
    # the linear probe keys its feature cache on the encoder's bytes; batch norm's 0-dim
    # num_batches_tracked once made that raise for every conv encoder
    from downstream.features import encoder_fingerprint

    enc = _model(SELFIE).encoder
    before = encoder_fingerprint(enc)
    assert before == encoder_fingerprint(enc)
    enc.convs[3].num_batches_tracked += 1  # the 0-dim counter is part of the bytes
    assert encoder_fingerprint(enc) != before
