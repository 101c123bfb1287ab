"""The EMA teacher and latent targets (:mod:`pretrain.teacher`): the update against a hand
computation, no gradient and no optimizer slot for the teacher, the top-K target against a hand
computation, the export choice, collapse statistics, validation, and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import (
    EncoderConfig,
    EncoderEntry,
    PretrainConfig,
    RecipeConfig,
    TeacherConfig,
    to_plain,
)
from pretrain.engine import param_groups, pretrain
from pretrain.model import MIMModel
from pretrain.teacher import (
    SPATIAL_COLLAPSE_RATIO,
    EMATeacher,
    momentum_at,
    position_share,
    target_std,
    teacher_mix,
    within_image_std,
    within_to_batch_ratio,
)

ENC = EncoderConfig(arch="vit_micro_32")  # 2 blocks, width 32, 4x4 patches of 8 px
D2V = {"name": "data2vec", "masking": {"min_block_patches": 2, "ratio": 0.5},
       "target": {"latent": {"top_k": 2}}}  # fmt: skip


def _model(**recipe) -> MIMModel:
    torch.manual_seed(0)
    return MIMModel(ENC, RecipeConfig(**{**D2V, **recipe}))


def test_momentum_schedules_match_their_formulas():
    lin = TeacherConfig(momentum=0.9, momentum_end=1.0, momentum_steps=10)
    assert [momentum_at(lin, k, 99) for k in (0, 5, 10, 20)] == pytest.approx([0.9, 0.95, 1.0, 1.0])
    cos = TeacherConfig(momentum=0.9, momentum_end=1.0, momentum_steps=10, schedule="cosine")
    assert momentum_at(cos, 0, 99) == pytest.approx(0.9)
    assert momentum_at(cos, 5, 99) == pytest.approx(0.95)  # half way: cos(pi / 2) = 0
    assert momentum_at(cos, 2, 99) == pytest.approx(1.0 - 0.1 * (1 + math.cos(math.pi * 0.2)) / 2)
    whole = TeacherConfig(momentum=0.9, momentum_end=1.0)  # momentum_steps None: the whole run
    assert momentum_at(whole, 50, 100) == pytest.approx(0.95)


def test_ema_update_equals_a_hand_computation():
    model = _model(teacher={"momentum": 0.9, "momentum_end": 0.5, "momentum_steps": 4})
    teacher = model.target.teacher
    before = {n: p.detach().clone() for n, p in teacher.encoder.named_parameters()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    student = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    model.after_step(3)  # the third update: m = 0.9 + (0.5 - 0.9) * 2 / 4 = 0.7
    for n, p in teacher.encoder.named_parameters():
        torch.testing.assert_close(p, 0.7 * before[n] + 0.3 * student[n])
    assert teacher.last_momentum == pytest.approx(0.7)


@pytest.mark.parametrize("start, end, steps", [(0.99, 1.0, 40), (0.9, 0.99, 25), (0.5, 0.5, 10)])
def test_teacher_mix_equals_the_updates_it_describes(start, end, steps):
    # independent of teacher_mix's formula: run the EMA updates on one parameter whose teacher
    # starts at 1 and whose student after step k is 0 (the share of the init left) or k (the
    # mean step of the students averaged, once the init's part is taken out)
    cfg = TeacherConfig(momentum=start, momentum_end=end)
    share, centre = teacher_mix(cfg, steps)
    for student_value, expect in ((lambda k: 0.0, share), (lambda k: float(k), None)):
        student = nn.Linear(1, 1, bias=False)
        ema = EMATeacher(student, cfg)
        ema.total_steps = steps
        with torch.no_grad():
            ema.encoder.weight.fill_(1.0 if expect is not None else 0.0)
            for k in range(1, steps + 1):
                student.weight.fill_(student_value(k))
                ema.update(student, k)
        got = float(ema.encoder.weight)
        if expect is not None:
            assert got == pytest.approx(expect, rel=1e-5)
        else:  # teacher = sum_k w_k * k with sum_k w_k = 1 - share
            assert got / (1.0 - share) / steps == pytest.approx(centre, rel=1e-5)


def test_teacher_mix_of_the_demo_schedule_is_mostly_an_early_average():
    # latent_demo's I-JEPA entry before issue 13's fix: 0.99 -> 1.0 over its 540 steps keeps
    # exp(-0.01 * 540 / 2) of the random init and centres on the student of half the run,
    # where I-JEPA's own schedule over its ImageNet run centres near the end
    share, centre = teacher_mix(TeacherConfig(momentum=0.99, momentum_end=1.0), 540)
    assert share == pytest.approx(math.exp(-2.7), rel=0.05) and 0.45 < centre < 0.55
    _, ref = teacher_mix(TeacherConfig(momentum=0.996, momentum_end=1.0), 300 * 625)
    assert ref > 0.9
    assert teacher_mix(TeacherConfig(momentum=0.99, momentum_end=1.0), 0)[0] == 1.0


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer():
    model = _model()
    imgs, mask = torch.randn(2, 3, 32, 32), model.masker(2, torch.Generator().manual_seed(0))
    model(imgs, mask).loss.backward()
    teacher = list(model.target.teacher.parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for p in teacher)
    assert any(p.grad is not None for p in model.encoder.parameters())
    in_opt = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher}
    model.train()
    assert not model.target.teacher.encoder.training  # no drop path in the teacher


def test_top_k_instance_normed_target_equals_a_hand_computation(monkeypatch):
    model = _model(target={"latent": {"top_k": 2, "block_norm": "instance", "target_norm": "none"}})
    # three blocks' outputs [B=1, 1 + L=2, D=2]: the class token first, the last two are used
    outs = [torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 6.0]]]),
            torch.tensor([[[5.0, 5.0], [0.0, 4.0], [2.0, 0.0]]]),
            torch.tensor([[[7.0, 1.0], [1.0, 1.0], [5.0, 3.0]]])]  # fmt: skip
    monkeypatch.setattr(EMATeacher, "blocks", lambda self, imgs: outs)
    got = model.target(torch.zeros(1, 3, 32, 32)).value  # [1, 2, 2]
    # instance norm over the two patch tokens per channel: (x - mean) / sqrt(var_biased + eps)
    eps = 1e-5

    def inorm(a, b):
        m, v = (a + b) / 2, ((a - b) / 2) ** 2
        return (a - m) / math.sqrt(v + eps), (b - m) / math.sqrt(v + eps)

    # block 1: channel 0 (0, 2), channel 1 (4, 0); block 2: channel 0 (1, 5), channel 1 (1, 3)
    b1c0, b1c1, b2c0, b2c1 = inorm(0, 2), inorm(4, 0), inorm(1, 5), inorm(1, 3)
    want = torch.tensor([[[(b1c0[0] + b2c0[0]) / 2, (b1c1[0] + b2c1[0]) / 2],
                          [(b1c0[1] + b2c0[1]) / 2, (b1c1[1] + b2c1[1]) / 2]]])  # fmt: skip
    torch.testing.assert_close(got, want)


def test_layer_normed_average_and_final_norm_targets(monkeypatch):
    outs = [torch.randn(2, 17, 32) for _ in range(2)]
    monkeypatch.setattr(EMATeacher, "blocks", lambda self, imgs: outs)
    model = _model()  # data2vec: top 2 here, no per-block norm, layer norm of the average
    want = F.layer_norm((outs[0][:, 1:] + outs[1][:, 1:]) / 2, (32,))
    torch.testing.assert_close(model.target(torch.zeros(2, 3, 32, 32)).value, want)
    ijepa = _model(target={"latent": {"top_k": 1, "block_norm": "final", "target_norm": "layer"}})
    enc = ijepa.target.teacher.encoder
    want = F.layer_norm(enc.final_norm(outs[1][:, 1:]), (32,))
    torch.testing.assert_close(ijepa.target(torch.zeros(2, 3, 32, 32)).value, want)


def test_the_target_is_the_teachers_on_the_unmasked_image():
    model = _model()
    imgs = torch.randn(2, 3, 32, 32)
    blocks = model.target.teacher.encoder.forward_blocks(imgs)
    want = F.layer_norm((blocks[0][:, 1:] + blocks[1][:, 1:]) / 2, (32,))
    torch.testing.assert_close(model.target(imgs).value, want)
    assert model.target.out_dim == 32


def test_evaluate_picks_the_exported_encoder():
    student = _model()
    assert student.exported_encoder() == ("student", student.encoder)
    teacher = _model(teacher={"evaluate": "teacher"})
    assert teacher.exported_encoder() == ("teacher", teacher.target.teacher.encoder)


def test_target_std_and_cosine_show_a_collapse():
    assert target_std(torch.ones(10, 4)) == pytest.approx(1e-3)  # sqrt(0 + 1e-6)
    x = torch.randn(1000, 4)
    assert target_std(x) == pytest.approx(float(x.std(dim=0).mean()), rel=1e-3)
    model = _model()
    imgs, mask = torch.randn(2, 3, 32, 32), model.masker(2, torch.Generator().manual_seed(0))
    out = model(imgs, mask)
    assert set(out.stats) == {"target_std", "target_std_within", "cosine"}
    assert -1.0 <= out.stats["cosine"] <= 1.0 and out.stats["target_std"] > 0
    assert out.stats["target_std_within"] == pytest.approx(within_image_std(out.target))


def test_within_image_std_shows_a_spatial_collapse_the_batch_std_misses():
    # every patch of an image gets its image's one vector; the images differ
    per_image = torch.randn(8, 1, 16)
    collapsed = per_image.expand(8, 49, 16)
    assert within_image_std(collapsed) == pytest.approx(0.0, abs=1e-6)
    assert target_std(collapsed.reshape(-1, 16)) > 0.5  # the batch-wide std sees nothing
    x = torch.randn(4, 49, 16)
    want = sum(float(x[b, :, c].std()) for b in range(4) for c in range(16)) / 64  # independent
    assert within_image_std(x) == pytest.approx(want, rel=1e-5)
    assert math.isnan(within_image_std(torch.randn(4, 1, 16)))  # one patch: no spread to read


def test_position_share_is_the_between_position_variance_share():
    # targets that are their position's vector alone: share 1; that vector plus image noise
    # of equal variance: about a half; pure image noise: near 0
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 16, 8, generator=g)
    assert position_share(pos.expand(200, 16, 8)) == pytest.approx(1.0, abs=1e-6)
    assert position_share(torch.randn(200, 16, 8, generator=g)) < 0.02
    mixed = pos.expand(2000, 16, 8) + torch.randn(2000, 16, 8, generator=g) * float(pos.std())
    assert 0.4 < position_share(mixed) < 0.6
    # an independent two-loop computation of the one-way ANOVA share on a small tensor
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    n, L, D = x.shape
    grand = [sum(float(x[i, j, d]) for i in range(n) for j in range(L)) / (n * L) for d in range(D)]
    total = sum((float(x[i, j, d]) - grand[d]) ** 2 for i in range(n) for j in range(L) for d in range(D))
    means = [[sum(float(x[i, j, d]) for i in range(n)) / n for d in range(D)] for j in range(L)]
    between = n * sum((means[j][d] - grand[d]) ** 2 for j in range(L) for d in range(D))
    assert position_share(x) == pytest.approx(between / total, rel=1e-5)
    assert math.isnan(position_share(torch.randn(1, 4, 2)))  # one image: no spread over images


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"teacher": None}, "target 'latent' is computed by an EMA teacher: set recipe.teacher"),
        ({"name": "simmim", "teacher": {}}, "target 'pixels' has no teacher: remove recipe.teacher"),
        ({"encoder_mode": "visible"}, "head 'linear' predicts from every encoder token"),
    ],
)
def test_bad_teacher_combinations_fail_at_validation(recipe, match):
    with pytest.raises(ValueError, match=match):
        RecipeConfig(**{**D2V, **recipe})


def test_a_teacher_on_an_encoder_without_per_block_outputs_is_refused():
    with pytest.raises(ValueError, match="conv encoder .* use a ViT or BEiT encoder"):
        # data2vec's own init rule is for ViTs (refused first for a conv encoder): timm's here
        MIMModel(EncoderConfig(arch="ce_conv_32"), RecipeConfig(**D2V, encoder_init="timm"))
    # a model built without a validated config still refuses (the same rule, check_top_k)
    with pytest.raises(ValueError, match="top_k 6 averages the teacher's last 6 blocks, but the "
                       "vit encoder has 2 blocks"):
        MIMModel(ENC, RecipeConfig(name="data2vec"))


@pytest.mark.parametrize("arch,family", [("ce_conv_32", "conv"), ("swin_micro_32", "swin")])
def test_a_teacher_on_an_encoder_without_per_block_outputs_fails_at_validation(arch, family):
    recipe = {"name": "data2vec", "encoder_init": "timm"}
    with pytest.raises(ValueError, match=rf"recipe.target.type 'latent' is built from an EMA "
                       rf"teacher's per-block outputs, which encoder '{arch}' \({family}\) does "
                       r"not give at one width and grid: use a ViT or BEiT encoder"):
        PretrainConfig(encoder={"arch": arch}, recipe=recipe)
    with pytest.raises(ValueError, match=rf"pretrain.recipe.target.type 'latent' .* '{arch}'"):
        EncoderEntry(name="e", encoder={"arch": arch}, pretrain={"recipe": recipe})


@pytest.mark.parametrize(
    "recipe,block",
    [
        ({"name": "ibot", "local_crops": 0}, "ibot"),  # local crops: refused on iGPT first
        ({"name": "data2vec2", "target": {"latent": {"top_k": 2}}}, "latent"),
    ],
)
def test_a_class_token_loss_on_an_encoder_without_a_class_token_fails_at_validation(recipe, block):
    # iGPT's encoder is isotropic (a teacher can read it) but has no class token: iBOT's DINO
    # loss and data2vec 2.0's class-token regression would read the first patch instead
    recipe = {**recipe, "encoder_init": "timm"}
    weight = {"ibot": 1.0, "latent": 0.01}[block]  # the recipe files' values
    with pytest.raises(ValueError, match=rf"recipe.target.{block}.cls_weight {weight} weights a "
                       r"loss on the class token, but encoder 'igpt_micro_8' \(igpt\) has no "
                       rf"class token: set recipe.target.{block}.cls_weight: 0"):
        PretrainConfig(encoder={"arch": "igpt_micro_8"}, recipe=recipe)


def test_data2vec2_without_its_class_token_loss_runs_on_an_encoder_without_one():
    recipe = {"name": "data2vec2", "encoder_init": "timm",
              "target": {"latent": {"top_k": 2, "cls_weight": 0.0}}}  # fmt: skip
    cfg = PretrainConfig(encoder={"arch": "igpt_micro_8"}, recipe=recipe)
    assert cfg.recipe.target.latent.cls_weight == 0.0


@pytest.mark.parametrize("name,k", [("data2vec", 6), ("data2vec2", 10)])
def test_top_k_deeper_than_the_encoder_fails_at_validation(name, k):
    with pytest.raises(ValueError, match=rf"recipe.target.latent.top_k {k} averages the teacher's "
                       rf"last {k} blocks, but encoder 'vit_micro_32' has 2 blocks: set "
                       r"recipe.target.latent.top_k to at most 2"):
        PretrainConfig(encoder=ENC, recipe={"name": name})
    with pytest.raises(ValueError, match=rf"pretrain.recipe.target.latent.top_k {k}"):
        EncoderEntry(name="e", encoder=ENC, pretrain={"recipe": {"name": name}})
    ok = {"name": name, "target": {"latent": {"top_k": 2}}}
    assert PretrainConfig(encoder=ENC, recipe=ok).recipe.target.latent.top_k == 2


def test_new_keys_are_left_out_of_dumps_at_their_defaults():
    plain = to_plain(RecipeConfig(name="mae"))
    assert "teacher" not in plain and "latent" not in plain["target"]
    assert "beta" not in plain["loss"] and "patch_reduce" not in plain["loss"]
    d2v = to_plain(RecipeConfig(name="data2vec"))
    assert d2v["teacher"]["momentum"] == 0.999 and d2v["loss"]["beta"] == 2.0


def _cfg(data, steps, **train):
    return PretrainConfig(
        data={"source": str(data)}, encoder={"arch": "vit_micro_32"}, recipe=D2V,
        train={"epochs": 10, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4,
               "max_steps": steps, "num_recon_images": 2, "ckpt_every_steps": 2, **train},
    )  # fmt: skip


@pytest.mark.slow
def test_pretraining_with_a_teacher_writes_stats_and_exports_per_config(tiny_imagefolder, tmp_path):
    cfg = _cfg(tiny_imagefolder, 3)
    cfg.recipe.teacher.evaluate = "teacher"  # type: ignore[union-attr]
    res = pretrain(cfg, tmp_path / "o", log=lambda m: None)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["exported_encoder"] == "teacher" and summary["collapse"]["steps"] == 0
    assert (res.out_dir / summary["target_stats"]).stat().st_size > 0
    saved = torch.load(res.encoder_path, weights_only=False)
    assert saved["mimbench"]["exported"] == "teacher"
    hist = [json.loads(line) for line in (res.out_dir / "loss.jsonl").read_text().splitlines()]
    assert all({"target_std", "target_std_within", "cosine"} <= set(h) for h in hist)
    assert summary["final_target_std_within"] == pytest.approx(hist[-1]["target_std_within"])
    share, centre = teacher_mix(cfg.recipe.teacher, 3)  # type: ignore[arg-type]
    assert (summary["teacher_init_share"], summary["teacher_centre"]) == pytest.approx((share, centre))
    want = sum(h["target_std_within"] / h["target_std"] for h in hist) / len(hist)  # 3 steps < 10
    spatial = summary["spatial_collapse"]
    assert spatial["within_to_batch_std"] == pytest.approx(want)
    assert spatial["flagged"] == (want < SPATIAL_COLLAPSE_RATIO) and spatial["threshold"] == 0.5


def test_within_to_batch_ratio_averages_the_last_logged_steps():
    hist = [{"target_std": 1.0, "target_std_within": 0.9}] * 5 + [
        {"target_std": 2.0, "target_std_within": 0.2 * (i + 1)} for i in range(10)
    ]
    assert within_to_batch_ratio(hist) == pytest.approx(sum(0.1 * (i + 1) for i in range(10)) / 10)
    assert within_to_batch_ratio(hist, last=2) == pytest.approx((0.9 + 1.0) / 2)
    assert within_to_batch_ratio([{"target_std": 1.0, "target_std_within": math.nan}]) is None
    assert within_to_batch_ratio([]) is None


def test_a_spatial_collapse_is_logged_and_flagged(tiny_imagefolder, tmp_path, monkeypatch):
    from pretrain.teacher import LatentTarget

    def one_vector_per_image(self, pred, tgt, mask):  # targets spread 10x less within images
        return {"target_std": 1.0, "target_std_within": 0.1, "cosine": 0.5}

    monkeypatch.setattr(LatentTarget, "statistics", one_vector_per_image)
    lines: list[str] = []
    res = pretrain(_cfg(tiny_imagefolder, 2, log_every_steps=1), tmp_path / "o", log=lines.append)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["spatial_collapse"] == {"within_to_batch_std": pytest.approx(0.1),
                                           "threshold": 0.5, "flagged": True}  # fmt: skip
    assert summary["collapse"]["steps"] == 0  # the batch-wide check sees nothing
    assert any("spatial collapse" in m and "0.10 times" in m for m in lines)


@pytest.mark.slow
def test_resume_is_bitwise_with_a_teacher(tiny_imagefolder, tmp_path):
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
    assert la == lb  # losses and target statistics, bitwise


@pytest.mark.slow
def test_a_tiny_sweep_over_a_latent_axis_runs(tiny_imagefolder, tmp_path):
    from harness.core.config import validate_config
    from harness.stages import pretrain_config_for
    from harness.sweep import expand_sweep, variant_name

    suite = {
        "kind": "suite", "name": "t", "data": {"source": str(tiny_imagefolder)},
        "encoders": [{"name": "d2v", "encoder": {"arch": "vit_micro_32"}, "pretrain": {
            "recipe": D2V,
            "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4,
                      "max_steps": 2, "num_recon_images": 0}}}],
        "tasks": [{"name": "linear_probe"}],
        "sweep": {"prefix": "encoders.0.pretrain.recipe",
                  "axes": {"target.latent.block_norm": ["none", "instance", "layer"]}},
    }  # fmt: skip
    rows = expand_sweep(suite)
    assert [t["block_norm"] for t, _ in rows] == ["none", "instance", "layer"]
    losses = []
    for tags, raw in rows:
        cfg = validate_config(raw)
        pcfg = pretrain_config_for(cfg.encoders[0], cfg, 0)
        res = pretrain(pcfg, tmp_path / variant_name(tags), log=lambda m: None)
        assert res.steps == 2 and math.isfinite(res.final_loss)
        losses.append(res.final_loss)
    assert len(set(losses)) == 3  # each row trained against its own targets
