"""iBOT and CAPI-style clustering: Sinkhorn-Knopp, centring, the losses on hand-computed cases,
iBOT's masks over many draws, the views, both recipes on a fixed batch, the teacher outside the
gradient, and validation of the combinations that cannot work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TWO_STEP_TRAIN
from PIL import Image

from harness.core.config import (
    ConfigError,
    EncoderConfig,
    IBOTConfig,
    MaskingConfig,
    PretrainConfig,
    RecipeConfig,
)
from harness.core.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    MultiView,
    collate_skipping,
    pretrain_transform,
)
from harness.core.data.shards import StreamItem, collate_stream
from pretrain.capi import OnlineClustering, sinkhorn_knopp
from pretrain.engine import param_groups, pretrain
from pretrain.ibot import (
    Centering,
    DINOHead,
    dino_cls_loss,
    ibot_patch_loss,
    soft_cross_entropy,
    teacher_temp_at,
)
from pretrain.masking import IBOTBlockMasker, create_masker
from pretrain.model import create_model

ARCH = "vit_micro_32"
# micro-sized heads: the recipes' 8192 / 16384 prototypes and 2048-wide MLPs are for ViT-B
# the recipe's 10 local crops of 96 px are for 224 px global crops: the 32 px micro runs keep
# none, or (MICRO_IBOT_LOCAL) two of 16 px, two patches a side
MICRO_IBOT = {
    "name": "ibot",
    "local_crops": 0,
    "target": {"ibot": {"out_dim": 64, "patch_out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}},
}
MICRO_IBOT_LOCAL = {**MICRO_IBOT, "local_crops": 2, "local_crop_size": 16}
MICRO_CAPI = {
    "name": "capi",
    "head": {"depth": 1, "dim": 32, "num_heads": 2},
    "target": {"clustering": {"num_clusters": 32}},
}


# --------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_one_round_by_hand():
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = sinkhorn_knopp(m.log(), iterations=1, eps=0.0)
    # columns to 1: [[1/4, 2/6], [3/4, 4/6]]; then rows to 1
    r0 = torch.tensor([0.25, 1 / 3]) / (0.25 + 1 / 3)
    r1 = torch.tensor([0.75, 2 / 3]) / (0.75 + 2 / 3)
    torch.testing.assert_close(out, torch.stack([r0, r1]))


def test_sinkhorn_reaches_the_marginals():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, 3, generator=g)  # two independent problems of 6 items, 3 clusters
    out = sinkhorn_knopp(scores, iterations=300)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 6))  # each item: a distribution
    torch.testing.assert_close(out.sum(-2), torch.full((2, 3), 2.0), atol=1e-4, rtol=0)  # N / K
    assert (out > 0).all()


def test_online_clustering_balances_over_the_batch_per_position():
    cfg = RecipeConfig(**MICRO_CAPI).target.clustering.model_copy(
        update={"num_clusters": 4, "sinkhorn_iters": 200, "target_temp": 1.0}
    )
    head = OnlineClustering(8, cfg)
    x = torch.randn(8, 3, 8, generator=torch.Generator().manual_seed(1))  # [B, L, D]
    assign, loss, _ = head(x)
    assert assign.shape == (8, 3, 4) and not assign.requires_grad
    torch.testing.assert_close(assign.sum(-1), torch.ones(8, 3))
    torch.testing.assert_close(assign.sum(0), torch.full((3, 4), 2.0), atol=1e-3, rtol=0)
    loss.backward()  # the head's own loss trains the head
    assert head.layer.weight.grad is not None and head.layer.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- iBOT's pieces


def test_centering_is_an_ema_of_the_batch_mean():
    c = Centering(2, momentum=0.9)
    c.update(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))  # mean [1, 2]
    torch.testing.assert_close(c.center, torch.tensor([0.1, 0.2]))
    c.update(torch.tensor([[[3.0, 4.0]], [[3.0, 4.0]]]))  # [B, L, K]: every token, mean [3, 4]
    torch.testing.assert_close(c.center, torch.tensor([0.9 * 0.1 + 0.3, 0.9 * 0.2 + 0.4]))


def test_teacher_temperature_warms_up_linearly():
    assert teacher_temp_at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temp_at(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temp_at(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temp_at(5, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_patch_loss_by_hand():
    t = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # teacher at two positions
    s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # student logits
    teacher = torch.stack([t, t]).unsqueeze(1)  # [B=2, V=1, L=2, K=2]
    student = torch.stack([s, s]).unsqueeze(1)
    mask = torch.tensor([[[True, True]], [[False, False]]])  # image 1 is not masked
    # image 0: mean of ln 2 and -ln(3/4); image 1: 0 (no masked patch); mean over images
    expect = (math.log(2.0) - math.log(0.75)) / 2 / 2
    assert float(ibot_patch_loss(student, teacher, mask, temp=1.0)) == pytest.approx(expect)
    # the student temperature divides the logits: at 0.5, logits [2 ln 3, 0] -> p = [0.9, 0.1]
    one = torch.tensor([[[True, False]]])
    got = ibot_patch_loss(s.view(1, 1, 2, 2) / 2, t.view(1, 1, 2, 2), one, temp=0.5)
    assert float(got) == pytest.approx(math.log(2.0))


def test_dino_loss_by_hand():
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, V=2, K=2]
    student = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # view 1: p = [0.75, 0.25]
    # pairs (teacher 0, student 1): -ln 0.75; (teacher 1, student 0): -ln 0.5; no same-view pair
    expect = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(dino_cls_loss(student, teacher, temp=1.0)) == pytest.approx(expect)


def test_dino_loss_with_local_crops_by_hand():
    # 2 global crops seen by both, 2 local crops by the student only (iBOT's multi-crop)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, G=2, K=2]
    ln3 = math.log(3.0)
    student = torch.tensor([[[0.0, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])  # [1, V=4, 2]
    # student p: global 0 [1/2, 1/2], global 1 [3/4, 1/4], local 2 [1/4, 3/4], local 3 [3/4, 1/4]
    # teacher 0 (one-hot class 0) with students 1, 2, 3: -ln 3/4, -ln 1/4, -ln 3/4
    # teacher 1 (one-hot class 1) with students 0, 2, 3: -ln 1/2, -ln 3/4, -ln 1/4
    # 6 = G * (V - 1) pairs (reference iBOTLoss: every (q, v) with v != q)
    logs = [0.75, 0.25, 0.75, 0.5, 0.75, 0.25]
    expect = -sum(math.log(x) for x in logs) / 6
    assert float(dino_cls_loss(student, teacher, temp=1.0)) == pytest.approx(expect)
    with pytest.raises(ValueError, match="2 teacher crops but only 1 student crops"):
        dino_cls_loss(student[:, :1], teacher, temp=1.0)


@pytest.mark.parametrize("shared", [True, False])
def test_dino_head_shapes_and_weight_norm(shared):
    cfg = IBOTConfig(out_dim=12, patch_out_dim=12 if shared else 7, hidden_dim=16,
                     bottleneck_dim=8, shared_head=shared, norm_last_layer=True)  # fmt: skip
    head = DINOHead(10, cfg)
    cls, patch = head(torch.randn(3, 1 + 5, 10))
    assert cls.shape == (3, 12) and patch.shape == (3, 5, 12 if shared else 7)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))
    assert (head.patch_last_layer is None) == shared
    # the last layer's rows have norm 1 (gain 1), so logits of a unit vector lie in [-1, 1]
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(12))


# --------------------------------------------------------------------------- masks and views


def test_ibot_masks_meet_their_statistics():
    cfg = MaskingConfig(strategy="ibot_block", ratio=0.3, ratio_var=0.2, mask_prob=0.5)
    m = create_masker(cfg, (14, 14), 16)
    assert isinstance(m, IBOTBlockMasker) and m.min_area == 16  # (14 // 3)^2, BEiT's 16
    mask = m(2000, generator=torch.Generator().manual_seed(0))
    counts = mask.sum(1).float()
    unmasked = float((counts == 0).float().mean())
    assert abs(unmasked - 0.5) < 0.05  # mask_prob 0.5
    frac = counts[counts > 0] / 196
    assert float(frac.max()) <= 0.5 + 1e-9  # never more than the largest ratio
    assert 0.26 < float(frac.mean()) < 0.31  # the middle ratio 0.3, some draws falling short
    assert len(set(counts.tolist())) > 20  # a count per image
    draws = []
    for _ in range(500):
        m(1, generator=None)
        draws.append(m.last_ratio)
    drawn = [r for r in draws if r > 0]
    assert min(drawn) >= 0.1 and max(drawn) <= 0.5 and abs(len(drawn) / 500 - 0.5) < 0.1


def test_capi_inverse_block_masks_meet_their_statistics():
    cfg = MaskingConfig(strategy="capi_inverse_block", ratio=0.65, min_aspect=0.5)
    m = create_masker(cfg, (14, 14), 16)
    assert m.num_masked == int(196 * 0.65)  # the reference's int(n_tokens * mask_ratio)
    g = torch.Generator().manual_seed(0)
    freq = torch.zeros(196)
    for _ in range(400):
        mask = m(1, generator=g)[0]
        assert int(mask.sum()) == 127
        h, w, aspect, dy, dx = m.last_box
        assert 0.5 - 1e-9 <= aspect <= 2.0 + 1e-9
        vis = (~mask).view(14, 14).roll((-dy, -dx), (0, 1))  # undo the roll: one box
        rows, cols = vis.any(1).nonzero()[:, 0], vis.any(0).nonzero()[:, 0]
        assert int(rows[-1] - rows[0]) + 1 <= h and int(cols[-1] - cols[0]) + 1 <= w
        freq += (~mask).float()
    # the random roll spreads the visible patches over the whole image
    assert float(freq.min()) > 0 and float(freq.max()) / float(freq.mean()) < 2.0


def test_view_masks_and_views_are_independent():
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**MICRO_IBOT))
    mask = model.masker(64, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 2, model.encoder.num_patches)
    assert not torch.equal(mask[:, 0], mask[:, 1])
    img = Image.new("RGB", (48, 48))
    img.paste((200, 10, 10), (0, 0, 24, 48))
    views = MultiView(pretrain_transform(32, (0.2, 1.0), True), 2)(img)
    assert views.shape == (2, 3, 32, 32) and not torch.equal(views[0], views[1])


def _coordinate_image(n: int = 240) -> Image.Image:
    """Red = x / (n - 1), green = y / (n - 1): a crop's pixels say where in the image it lies."""
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    rgb = torch.stack([ramp.view(1, n).expand(n, n), ramp.view(n, 1).expand(n, n),
                       torch.zeros(n, n, dtype=torch.float64)], dim=-1)  # fmt: skip
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def _area_fractions(crops: torch.Tensor) -> torch.Tensor:
    """``[N, 3, s, s]`` normalized crops of :func:`_coordinate_image` -> the share of the image's
    area each covers, from the span of its x and y coordinates."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = crops * std + mean
    span = rgb.flatten(2).amax(-1) - rgb.flatten(2).amin(-1)  # [N, 3]
    return span[:, 0] * span[:, 1]


def test_local_crops_meet_the_recipe_files_size_and_scale():
    rec = RecipeConfig(name="ibot")
    # README: --local_crops_number 10, --local_crops_scale 0.05 0.25; DataAugmentationiBOT: 96 px
    assert (rec.local_crops, rec.local_crop_size, rec.local_crop_scale) == (10, 96, (0.05, 0.25))
    crops = MultiView(pretrain_transform(224, (0.25, 1.0), True), 2,
                      pretrain_transform(rec.local_crop_size, rec.local_crop_scale, True),
                      rec.local_crops)  # fmt: skip
    img = _coordinate_image()
    torch.manual_seed(0)
    draws = [crops(img) for _ in range(60)]
    assert all(isinstance(d, Crops) for d in draws)
    views = torch.cat([d.views for d in draws])  # [120, 3, 224, 224]
    local = torch.cat([d.local for d in draws])  # [600, 3, 96, 96]
    assert views.shape[1:] == (3, 224, 224) and local.shape == (600, 3, 96, 96)
    a_local, a_views = _area_fractions(local), _area_fractions(views)
    # the spans miss about one source pixel a side of the 240: a few percent of a small crop
    assert float(a_local.min()) > 0.05 * 0.85 and float(a_local.max()) < 0.25 * 1.02
    assert abs(float(a_local.mean()) - 0.15) < 0.012  # uniform area in [0.05, 0.25]
    assert float(a_local.std()) > 0.04  # spread over the range (uniform: 0.058)
    assert float(a_views.min()) > 0.25 * 0.9 and float(a_views.mean()) > 0.45
    # each crop its own draw: the 10 local crops of an image start at different places
    assert all(len({tuple(c[:2, 0, 0].tolist()) for c in d.local}) == 10 for d in draws)


def test_crops_batch_through_the_collate_with_unreadable_samples():
    mv = MultiView(pretrain_transform(32, (0.25, 1.0), True), 2,
                   pretrain_transform(16, (0.05, 0.25), True), 3)  # fmt: skip
    img = Image.new("RGB", (48, 48), (120, 30, 200))
    one = mv(img)
    assert isinstance(one, Crops) and one.views.shape == (2, 3, 32, 32)
    assert one.local.shape == (3, 3, 16, 16)
    imgs, labels, kept = collate_skipping([(one, 0), None, (mv(img), 1)])
    assert isinstance(imgs, Crops) and kept.tolist() == [True, False, True]
    assert imgs.views.shape == (2, 2, 3, 32, 32) and imgs.local.shape == (2, 3, 3, 16, 16)
    assert labels.tolist() == [0, 1] and torch.equal(imgs.views[0], one.views)
    # the shard stream's collate the same way (data.stream)
    items = [StreamItem(one, 0, "a.tar/0.png"), StreamItem(None, 0, "a.tar/1.png", "broken"),
             StreamItem(mv(img), 1, "a.tar/2.png")]  # fmt: skip
    imgs, _, kept, _, bad = collate_stream(items)
    assert isinstance(imgs, Crops) and imgs.local.shape == (2, 3, 3, 16, 16)
    assert kept.tolist() == [True, False, True] and bad == ["a.tar/1.png: broken"]
    with pytest.raises(ValueError, match="3 local views need their transform"):
        MultiView(pretrain_transform(32, (0.25, 1.0), True), 2, None, 3)


def test_vit_encodes_other_sizes_with_resampled_positions():
    torch.manual_seed(0)
    enc = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**MICRO_IBOT)).encoder.eval()
    with torch.no_grad():
        enc.vit.pos_embed.normal_()  # a position embedding whose interpolation shows
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(enc.forward_resized(x), enc.forward_features(x))  # own grid
        small = torch.randn(2, 3, 16, 16)
        out = enc.forward_resized(small)
        assert out.shape == (2, 1 + 4, 32)
        # independently, as the reference's interpolate_pos_encoding: the 4x4 position grid
        # scaled by (2 + 0.1) / 4 (bicubic), patch embedding, class token, blocks, final norm
        pos = enc.vit.pos_embed
        grid = pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        small_pos = F.interpolate(grid, scale_factor=(2.1 / 4, 2.1 / 4), mode="bicubic")
        by_size = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
        assert (small_pos - by_size).abs().max() > 1e-3  # a size-driven resample would fail here
        t = enc.vit.patch_embed.proj(small).flatten(2).transpose(1, 2)
        t = t + small_pos.permute(0, 2, 3, 1).reshape(1, 4, 32)
        t = torch.cat([(enc.vit.cls_token + pos[:, :1]).expand(2, -1, -1), t], dim=1)
        torch.testing.assert_close(out, enc.vit.norm(enc.vit.blocks(t)))
    with pytest.raises(ValueError, match="12x12 image is not tiled by 8 px patches"):
        enc.forward_resized(torch.randn(1, 3, 12, 12))


def test_local_crops_need_an_encoder_that_takes_other_sizes():
    enc = EncoderConfig(arch=ARCH, rel_pos_bias="per_block")  # the beit family: one input size
    with pytest.raises(ValueError, match=r"local_crops 2.*beit encoder takes one input size"):
        create_model(enc, RecipeConfig(**MICRO_IBOT_LOCAL))
    # and at validation (the family's class in core's registry), with the key path
    with pytest.raises(ValueError, match=r"recipe.local_crops 2: .* a beit encoder takes one "
                       r"input size .* or recipe.local_crops: 0"):
        PretrainConfig(encoder=enc, recipe=MICRO_IBOT_LOCAL)


def _local(n: int = 4, v: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, v, 3, 16, 16, generator=g)
    x[..., 4:12, 4:12] += 1.0
    return (x - 0.5) / 0.5


def test_ibot_loss_with_local_crops_against_the_reference_loop():
    torch.manual_seed(0)
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**MICRO_IBOT_LOCAL)).eval()
    model.set_run_length(10)
    imgs, local = _views(), _local()
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))  # [4, 2, 16]
    with torch.no_grad():
        got = model(imgs, mask, local).loss
        without = model(imgs, mask).loss
        # iBOTLoss.forward: the student's class logits of the global crops, then of the local
        # ones (through the head's full forward here), every (teacher q, student v != q) pair
        tgt, enc, head = model.target(imgs), model.encoder, model.target.student_head
        c = model.recipe.target.ibot
        g_cls, g_patch = head(enc.forward_features(imgs.flatten(0, 1), mask.flatten(0, 1)))
        l_cls, _ = head(enc.forward_resized(local.flatten(0, 1)))
        student = torch.cat([g_cls.view(4, 2, -1), l_cls.view(4, 2, -1)], dim=1)  # [4, 4, K]
        terms = [soft_cross_entropy(tgt.cls[:, q], student[:, v], c.student_temp).mean()
                 for q in range(2) for v in range(4) if v != q]  # fmt: skip
        assert len(terms) == 6  # G * (G + L - 1)
        patch = ibot_patch_loss(g_patch.view(4, 2, 16, -1), tgt.value, mask, c.student_temp)
        expect = c.patch_weight * patch + c.cls_weight * torch.stack(terms).mean()
        plain = c.patch_weight * patch + c.cls_weight * torch.stack([terms[0], terms[3]]).mean()
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(without, plain)  # no local crops: the 2 global pairs
    assert not torch.isclose(got, without)


# --------------------------------------------------------------------------- recipes


def _views(n: int = 4, v: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, v, 3, 32, 32, generator=g)
    x[..., 8:24, 8:24] += 1.0
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("rec", [MICRO_IBOT, MICRO_IBOT_LOCAL, MICRO_CAPI],
                         ids=["ibot", "ibot_local", "capi"])
def test_recipe_trains_on_a_fixed_batch_and_the_teacher_gets_no_gradient(rec):
    torch.manual_seed(0)
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**rec))
    model.set_run_length(20)
    imgs = _views()[:, 0] if rec is MICRO_CAPI else _views()
    local = _local() if rec is MICRO_IBOT_LOCAL else None
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    teacher = list(model.target.teacher.parameters())
    assert teacher and not any(id(p) in in_opt for p in teacher)
    losses = []
    for step in range(1, 9):
        out = model(imgs, mask, local)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in teacher)
        opt.step()
        model.after_step(step)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    # iBOT's first loss compares the student with its own copy (the teacher), so the first
    # update raises it; from there the student learns to match the teacher
    start = 0 if rec is MICRO_CAPI else 1
    assert losses[-1] < losses[start], losses


def test_ibot_teacher_head_follows_the_student_head():
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**MICRO_IBOT))
    tgt = model.target
    s, t = tgt.student_head.mlp[0].weight, tgt.teacher_head.encoder.mlp[0].weight
    assert torch.equal(s, t) and not t.requires_grad and s.requires_grad
    with torch.no_grad():
        s.add_(1.0)
    before = t.clone()
    model.after_step(1)
    m = tgt.teacher_head.last_momentum
    torch.testing.assert_close(t, m * before + (1 - m) * s)
    assert int(tgt.steps_done) == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "rec,match",
    [
        ({"name": "mae", "global_crops": 2}, r"global_crops 2.*target 'norm_pixels'"),
        ({"name": "ibot", "global_crops": 1}, r"cls_weight 1.0.*global_crops is 1"),
        # the recipe's 96 px local crops on 32 px global ones
        ({"name": "ibot"}, r"local_crop_size 96 is larger than .*img_size 32.*lower local_crop_size"),
        ({**MICRO_IBOT, "local_crops": 2, "local_crop_size": 12},
         r"local_crop_size 12 is not a multiple of the patch size 8.*use 8 or 16"),
        ({**MICRO_IBOT, "local_crops": -1}, r"local_crops\n.*greater than or equal to 0"),
        ({**MICRO_IBOT_LOCAL, "local_crop_scale": [0.3, 0.2]}, r"local_crop_scale \[0.3, 0.2\]"),
        ({**MICRO_IBOT_LOCAL, "local_crop_scale": [0.0, 0.2]}, r"0 < low <= high <= 1"),
        ({**MICRO_IBOT_LOCAL, "local_crop_scale": [0.1, 1.5]}, r"0 < low <= high <= 1"),
        ({"name": "mae", "local_crops": 2}, r"local_crops 2: target 'norm_pixels' takes no local"),
        ({**MICRO_IBOT_LOCAL, "target": {"ibot": {"cls_weight": 0.0}}},
         r"local crops feed only the class-token loss.*cls_weight > 0 \(got 0.0\)"),
        ({"name": "beit", "masking": {"ratio_var": 0.1}}, r"ratio_var 0.1.*strategy 'block'"),
        ({"name": "mae", "masking": {"strategy": "ibot_block"}}, r"'ibot_block'.*encoder_mode"),
        ({"name": "ibot", "target": {"ibot": {"patch_out_dim": 10}}}, r"out_dim 8192 != patch_out_dim 10"),
        # CAPI's target type was 'clusters', which read like target.clusters (colour clusters)
        ({"name": "capi", "target": {"type": "clusters"}},
         r"target.type 'clusters' was renamed 'online_clusters'.*use target.type: online_clusters"),
    ],
)
def test_combinations_that_cannot_work_fail_at_validation(rec, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        PretrainConfig(encoder={"arch": ARCH}, recipe=rec)


def test_local_crop_keys_stay_out_of_dumps_at_their_defaults():
    mae = RecipeConfig(name="mae").model_dump()
    assert not {"local_crops", "local_crop_size", "local_crop_scale"} & set(mae)
    ibot = RecipeConfig(name="ibot").model_dump()
    assert (ibot["local_crops"], ibot["local_crop_scale"]) == (10, (0.05, 0.25))
    assert "local_crop_size" not in ibot  # 96 is the schema default as well
    assert "local_crops" not in RecipeConfig(**MICRO_IBOT).model_dump()


def test_fast_decode_with_several_views_is_refused():
    # the draft-mode crop decodes each image once for one crop: iBOT's two views need the slow path
    with pytest.raises((ConfigError, ValueError), match=r"fast_decode.*global_crops is 2"):
        PretrainConfig(encoder={"arch": ARCH}, recipe=MICRO_IBOT, data={"fast_decode": True})
    PretrainConfig(encoder={"arch": ARCH}, recipe=MICRO_IBOT)  # one decode per view: accepted


# --------------------------------------------------------------------------- engine and resume


def test_engine_feeds_the_local_crops_to_the_student(tiny_imagefolder, tmp_path, monkeypatch):
    from pretrain.encoders.vit import ViTEncoder

    seen: list[tuple[int, ...]] = []
    resized = ViTEncoder.forward_resized

    def spy(self, x):
        seen.append(tuple(x.shape))
        return resized(self, x)

    monkeypatch.setattr(ViTEncoder, "forward_resized", spy)
    train = TWO_STEP_TRAIN
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": ARCH},
                         recipe=MICRO_IBOT_LOCAL, train=train)  # fmt: skip
    res = pretrain(cfg, tmp_path / "run", log=lambda m: None)
    assert res.steps == 2 and math.isfinite(res.final_loss)
    assert seen == [(4 * 2, 3, 16, 16)] * 2  # 2 local crops of 16 px per image, once a step


class _Cut(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("rec", [MICRO_IBOT, MICRO_IBOT_LOCAL, MICRO_CAPI],
                         ids=["ibot", "ibot_local", "capi"])
def test_engine_resume_is_bitwise_with_teacher_centres_and_clustering(tiny_imagefolder, tmp_path, rec):
    train = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "base_lr": 1e-3, "lr_base_batch": 4,
             "max_steps": 4, "ckpt_every_steps": 2, "log_every_steps": 1, "num_recon_images": 2}
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": ARCH},
                         recipe=rec, train=train)  # fmt: skip
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)
    assert full.steps == 4 and math.isfinite(full.final_loss)

    def cut_at_3(msg: str) -> None:
        if "step 3/" in msg:
            raise _Cut

    with pytest.raises(_Cut):
        pretrain(cfg, tmp_path / "cut", log=cut_at_3)
    pretrain(cfg, tmp_path / "cut", resume=True, log=lambda m: None)
    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and any(k.startswith("target.teacher.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
