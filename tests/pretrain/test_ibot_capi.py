"""iBOT and CAPI-style clustering: Sinkhorn-Knopp, centring, the losses on hand-computed cases,
iBOT's masks over many draws, the views, both recipes on a fixed batch, the teacher outside the
gradient, and validation of the combinations that cannot work."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from harness.core.config import (
    ConfigError,
    EncoderConfig,
    IBOTConfig,
    MaskingConfig,
    PretrainConfig,
    RecipeConfig,
)
from harness.core.data.datasets import MultiView, pretrain_transform
from pretrain.capi import OnlineClustering, sinkhorn_knopp
from pretrain.engine import param_groups, pretrain
from pretrain.ibot import (
    Centering,
    DINOHead,
    dino_cls_loss,
    ibot_patch_loss,
    teacher_temp_at,
)
from pretrain.masking import IBOTBlockMasker, create_masker
from pretrain.model import create_model

ARCH = "vit_micro_32"
# micro-sized heads: the recipes' 8192 / 16384 prototypes and 2048-wide MLPs are for ViT-B
MICRO_IBOT = {
    "name": "ibot",
    "target": {"ibot": {"out_dim": 64, "patch_out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}},
}
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


# --------------------------------------------------------------------------- recipes


def _views(n: int = 4, v: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, v, 3, 32, 32, generator=g)
    x[..., 8:24, 8:24] += 1.0
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("rec", [MICRO_IBOT, MICRO_CAPI], ids=["ibot", "capi"])
def test_recipe_trains_on_a_fixed_batch_and_the_teacher_gets_no_gradient(rec):
    torch.manual_seed(0)
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**rec))
    model.set_run_length(20)
    imgs = _views() if rec is MICRO_IBOT else _views()[:, 0]
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    teacher = list(model.target.teacher.parameters())
    assert teacher and not any(id(p) in in_opt for p in teacher)
    losses = []
    for step in range(1, 9):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in teacher)
        opt.step()
        model.after_step(step)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    # iBOT's first loss compares the student with its own copy (the teacher), so the first
    # update raises it; from there the student learns to match the teacher
    start = 1 if rec is MICRO_IBOT else 0
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
        ({"name": "ibot", "local_crops": 10}, r"local_crops 10"),
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


def test_fast_decode_with_several_views_is_refused():
    # the draft-mode crop decodes each image once for one crop: iBOT's two views need the slow path
    with pytest.raises((ConfigError, ValueError), match=r"fast_decode.*global_crops is 2"):
        PretrainConfig(encoder={"arch": ARCH}, recipe=MICRO_IBOT, data={"fast_decode": True})
    PretrainConfig(encoder={"arch": ARCH}, recipe=MICRO_IBOT)  # one decode per view: accepted


# --------------------------------------------------------------------------- engine and resume


class _Cut(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("rec", [MICRO_IBOT, MICRO_CAPI], ids=["ibot", "capi"])
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
