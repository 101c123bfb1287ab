"""Every recipe and every axis value builds, trains on a fixed batch, and draws its picture."""

from __future__ import annotations

import pytest
import timm
import torch

from harness.core.config import ConfigError, EncoderConfig, PretrainConfig, RecipeConfig
from pretrain.context_encoder import Discriminator, adversarial_losses
from pretrain.encoders import create_encoder, load_encoder
from pretrain.engine import ENCODER, param_groups, pretrain
from pretrain.heads import HEADS
from pretrain.model import create_model
from pretrain.targets import TARGETS

TOK = {"type": "kmeans", "vocab_size": 16, "input_size": None, "train_images": 8}
MICRO_MAE_HEAD = {"depth": 1, "dim": 32, "num_heads": 2}
# SimMIM's 32 px unit is the whole 32 px micro image (every patch masked: refused at validation)
MICRO_SIMMIM_MASKING = {"mask_patch_size": 16}

# (encoder preset, recipe): each paper's recipe on a micro encoder, then one case per axis value
CASES = {
    "simmim": ("vit_micro_32", {"name": "simmim", "masking": {"mask_patch_size": 16}}),
    "simmim_swin": ("swin_micro_32", {"name": "simmim", "masking": {"mask_patch_size": 8}}),
    "simmim_swinv2": ("swinv2_micro_32", {"name": "simmim", "masking": {"mask_patch_size": 8}}),
    "mae": ("vit_micro_32", {"name": "mae", "head": MICRO_MAE_HEAD}),
    "beit_kmeans": (
        "vit_micro_32",
        {"name": "beit", "masking": {"min_block_patches": 2}, "target": {"tokenizer": TOK}},
    ),
    "beit_vqvae": (
        "vit_micro_32",
        {
            "name": "beit",
            "masking": {"min_block_patches": 2},
            "target": {
                "tokenizer": {**TOK, "type": "vqvae", "train_steps": 3, "hidden": 8, "code_dim": 4}
            },
        },
    ),
    "beit_dvae": (
        "vit_micro_32",
        {
            "name": "beit",
            "masking": {"min_block_patches": 2},
            "target": {
                "tokenizer": {**TOK, "type": "dvae", "train_steps": 3, "hidden": 8, "code_dim": 4}
            },
        },
    ),
    "maskfeat": (
        "vit_micro_32",
        {
            "name": "maskfeat",
            "masking": {"min_block_patches": 2},
            "target": {"hog": {"gaussian_window": 8}},
        },
    ),
    "vit_mpp": ("vit_micro_32", {"name": "vit_mpp"}),
    "context_encoder": ("ce_conv_32", {"name": "context_encoder", "head": {"dim": 32}}),
    "data2vec": (
        "vit_micro_32",
        {
            "name": "data2vec",
            "masking": {"min_block_patches": 2, "ratio": 0.5},
            "target": {"latent": {"top_k": 2}},
        },
    ),
    "ijepa": (
        "vit_micro_32",
        {
            "name": "ijepa",
            "head": {"depth": 1, "dim": 16, "num_heads": 2},
            "masking": {"multiblock": {"min_context": 1}},
        },
    ),
    # axes
    "head_mlp": (
        "vit_micro_32",
        {"name": "simmim", "masking": MICRO_SIMMIM_MASKING, "head": {"type": "mlp", "dim": 32}},
    ),
    "head_inverse_swin": (
        "swin_micro_32",
        {
            "name": "simmim",
            "masking": {"mask_patch_size": 8},
            "head": {
                "type": "inverse_swin",
                "dim": 32,
                "num_heads": 2,
                "window_size": 4,
                "stage_depths": [1, 1, 1],
            },
        },
    ),
    "head_upconv_vit": (
        "vit_micro_32",
        {"name": "simmim", "masking": MICRO_SIMMIM_MASKING, "head": {"type": "upconv", "dim": 32}},
    ),
    "mae_with_mask_token": (
        "vit_micro_32",
        {"name": "mae", "encoder_mode": "mask_token", "head": MICRO_MAE_HEAD},
    ),
    "target_color_bins": (
        "vit_micro_32",
        {
            "name": "simmim",
            "masking": MICRO_SIMMIM_MASKING,
            "target": {"type": "color_bins", "bins": 4},
            "loss": {"type": "cross_entropy"},
        },
    ),
    "target_color_clusters_swin": (
        "swin_micro_32",
        {
            "name": "simmim",
            "masking": {"mask_patch_size": 8},
            "target": {"type": "color_clusters", "clusters": 16, "resolution": 8,
                       "tokenizer": {"type": "kmeans", "train_images": 8, "kmeans_iters": 3}},
            "loss": {"type": "cross_entropy"},
        },
    ),
    "target_mean_color": (
        "vit_micro_32",
        {
            "name": "simmim",
            "masking": MICRO_SIMMIM_MASKING,
            "target": {"type": "mean_color", "bins": 4},
            "loss": {"type": "cross_entropy"},
        },
    ),
    "target_hog_mae": (
        "vit_micro_32",
        {
            "name": "mae",
            "head": MICRO_MAE_HEAD,
            "target": {"type": "hog", "hog": {"cell_size": 4, "gaussian_window": 0}},
        },
    ),
    "target_tokens_mae": (
        "vit_micro_32",
        {
            "name": "mae",
            "head": MICRO_MAE_HEAD,
            "target": {"type": "tokens", "tokenizer": TOK},
            "loss": {"type": "cross_entropy"},
        },
    ),
    "loss_smooth_l1_all": (
        "vit_micro_32",
        {
            "name": "simmim",
            "masking": MICRO_SIMMIM_MASKING,
            "loss": {"type": "smooth_l1", "on": "all"},
        },
    ),
    "loss_l2": (
        "vit_micro_32",
        {"name": "simmim", "masking": MICRO_SIMMIM_MASKING, "loss": {"type": "l2"}},
    ),
    "masking_random_blocks": (
        "vit_micro_32",
        {
            "name": "simmim",
            "masking": {
                "strategy": "random_blocks",
                "ratio": 0.5,
                "mask_patch_size": None,
                "min_block_patches": 2,
            },
        },
    ),
    "masking_random_region": (
        "vit_micro_32",
        {
            "name": "mae",
            "head": MICRO_MAE_HEAD,
            "masking": {"strategy": "random_region", "ratio": 0.5},
        },
    ),
    "masking_central": (
        "vit_micro_32",
        {
            "name": "simmim",
            "masking": {"strategy": "central", "ratio": 0.25, "mask_patch_size": None},
        },
    ),
    "masking_grid_mae": (
        "vit_micro_32",
        {"name": "mae", "head": MICRO_MAE_HEAD, "masking": {"strategy": "grid"}},
    ),
    # data2vec 2.0 (clones: tests/pretrain/test_data2vec2.py): conv decoder, inverse blocks
    "data2vec2": (
        "vit_micro_32",
        {"name": "data2vec2", "clone_batch": 1, "masking": {"ratio": 0.5, "block_length": 2},
         "head": {"depth": 2, "dim": 32, "groups": 4}, "target": {"latent": {"top_k": 2}}},
    ),
}


def _images(arch: str, n: int = 4) -> torch.Tensor:
    size = int(EncoderConfig(arch=arch).img_size)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 1.0  # some structure
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_trains_on_a_fixed_batch(case):
    arch, rec = CASES[case]
    torch.manual_seed(0)
    model = create_model(EncoderConfig(arch=arch), RecipeConfig(**rec))
    imgs = _images(arch)
    model.prepare(lambda n: _images(arch, n), log=lambda m: None)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=2e-3)
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(6):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.parts["rec"]))
    assert torch.isfinite(out.loss)
    assert losses[-1] < losses[0], losses
    assert out.pred.shape == (4, model.encoder.num_patches, model.target.out_dim)
    rows = model.visualize(imgs, out)
    pictures = 2 if rec["name"] in ("data2vec", "data2vec2", "ijepa") else 4  # a latent target has no picture
    assert [r[0] for r in rows[:2]] == ["original", "masked"] and len(rows) == pictures
    for _, img in rows:
        assert img.shape == imgs.shape and img.min() >= 0 and img.max() <= 1


# trained on a fixed batch in tests/pretrain/test_ibot_capi.py (two views, soft targets: their
# predictions are not one row per patch of the target's width)
IBOT_CAPI_HEADS, IBOT_CAPI_TARGETS = {"identity", "cross_attention"}, {"ibot", "online_clusters"}
# trained on a fixed batch in tests/pretrain/test_lineage.py (their own models: scores over the
# masked patches, one classification per pair)
LINEAGE_HEADS = {"attention_pooling", "pair_classifier"}
LINEAGE_TARGETS = {"selfie", "relative_position"}


def test_every_head_and_target_is_exercised():
    heads = {CASES[c][1].get("head", {}).get("type") for c in CASES} | IBOT_CAPI_HEADS
    heads |= {RecipeConfig(**CASES[c][1]).head.type for c in CASES} | LINEAGE_HEADS
    assert set(HEADS.names()) <= heads
    targets = {RecipeConfig(**CASES[c][1]).target.type for c in CASES} | IBOT_CAPI_TARGETS
    targets |= LINEAGE_TARGETS
    assert set(TARGETS.names()) <= targets


def test_tokenizer_is_frozen_and_outside_the_optimizer():
    arch, rec = CASES["beit_kmeans"]
    model = create_model(EncoderConfig(arch=arch), RecipeConfig(**rec))
    model.prepare(lambda n: _images(arch, n), log=lambda m: None)
    assert bool(model.target.tokenizer.fitted)
    groups = param_groups(model, 0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in ids for p in model.target.tokenizer.parameters())
    assert "target.tokenizer.codebook" in model.state_dict()  # restored on resume


def test_vit_mpp_corruption_proportions():
    torch.manual_seed(0)
    model = create_model(EncoderConfig(arch="vit_micro_32"), RecipeConfig(name="vit_mpp"))
    enc = model.encoder
    calls = {}

    def spy(t, mask=None):
        calls["t"], calls["mask"] = t, mask
        return torch.zeros(t.shape[0], 1 + t.shape[1], t.shape[2])

    enc.forward_tokens = spy
    imgs = torch.randn(64, 3, 32, 32)
    mask = model.masker(64, generator=torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 8).all()  # 50 % of 16 patches
    model.encode(imgs, mask)
    clean = enc.patch_tokens(imgs)
    changed = (calls["t"] - clean).abs().sum(-1) > 0
    token = calls["mask"]
    assert not (token & ~mask).any() and not (changed & ~mask).any()  # only masked patches
    n = mask.sum().item()
    assert abs(token.sum().item() / n - 0.8) < 0.06
    assert abs(changed.sum().item() / n - 0.1) < 0.04
    # replaced embeddings are other patches' embeddings
    flat = clean.reshape(-1, clean.shape[-1])
    for v in calls["t"][changed][:20]:
        assert ((flat - v).abs().sum(-1) < 1e-6).sum() >= 1


def test_adversarial_losses_reach_only_their_own_networks():
    torch.manual_seed(0)
    disc = Discriminator(32)
    gen = torch.nn.Conv2d(3, 3, 1)
    real = torch.randn(2, 3, 32, 32)
    fake = gen(torch.randn(2, 3, 32, 32))
    g_loss, d_loss = adversarial_losses(disc, real, fake)
    g_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in disc.parameters()) and gen.weight.grad is not None
    gen.zero_grad()
    d_loss.backward()
    assert gen.weight.grad is None or gen.weight.grad.abs().sum() == 0
    assert all(p.grad is not None for p in disc.parameters())


def test_context_encoder_loss_weights():
    arch, rec = CASES["context_encoder"]
    model = create_model(EncoderConfig(arch=arch), RecipeConfig(**rec))
    assert model.recipe.loss.adv_weight == 0.001 and model.recipe.masking.strategy == "central"
    out = model(_images(arch), model.masker(4))
    p = out.parts
    assert torch.allclose(out.loss, 0.999 * p["rec"] + 0.001 * p["adv_g"] + p["adv_d"], atol=1e-5)


@pytest.mark.parametrize("arch", ["swin_micro_32", "swinv2_micro_32"])
def test_swin_encoder_checkpoint_loads_in_timm(tmp_path, arch):
    cfg = EncoderConfig(arch=arch)
    enc = create_encoder(cfg).eval()
    assert enc.encoder_stride == 16 and enc.feature_grid == (2, 2) and enc.num_prefix_tokens == 0
    enc.save_timm(tmp_path / "e.pth")
    model = timm.create_model(
        cfg.timm_name, checkpoint_path=str(tmp_path / "e.pth"), **cfg.timm_kwargs()
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x).flatten(1, 2), enc(x), atol=1e-5)
    again = load_encoder(tmp_path / "e.pth").eval()
    with torch.no_grad():
        assert torch.allclose(again(x), enc(x), atol=1e-6)
    # the mask token replaces the masked patch embeddings
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    t = enc.patch_tokens(x)
    t[:, :10] = enc.mask_token
    with torch.no_grad():
        assert torch.allclose(enc.forward_tokens(t), enc(x, mask), atol=1e-6)


def test_layer_ids_cover_every_parameter():
    for arch in ("swin_micro_32", "swinv2_micro_32", "ce_conv_32"):
        enc = create_encoder(EncoderConfig(arch=arch))
        ids = {enc.layer_id(n) for n, _ in enc.named_parameters()}
        assert min(ids) >= 0 and max(ids) <= enc.num_layers + 1 and len(ids) > 2


@pytest.mark.parametrize(
    "arch,rec,match",
    [
        (  # MAE's visible-only encoding (with the family's own init, so that check is reached)
            "swin_micro_32",
            {"name": "mae", "head": MICRO_MAE_HEAD, "encoder_init": "timm"},
            "needs a ViT encoder",
        ),
        (  # MAE's initialisation is written for ViTs
            "swin_micro_32",
            {"name": "mae", "head": MICRO_MAE_HEAD},
            "encoder_init 'mae' .* not a swin encoder",
        ),
        (
            "swin_micro_32",
            {
                "name": "simmim",
                "masking": {"mask_patch_size": 8},
                "head": {"type": "mae_decoder", **MICRO_MAE_HEAD},
            },
            "mae_decoder reads a ViT",
        ),
        (
            "vit_micro_32",
            {"name": "beit", "masking": {"min_block_patches": 2}},
            "needs the weights",
        ),
    ],
)
def test_combinations_that_cannot_work_fail_clearly(arch, rec, match):
    with pytest.raises(ValueError, match=match):
        create_model(EncoderConfig(arch=arch), RecipeConfig(**rec))


@pytest.mark.parametrize(
    "rec,match",
    [
        ({"name": "simmim", "target": {"type": "tokens"}}, "set loss.type: cross_entropy"),
        ({"name": "simmim", "loss": {"type": "cross_entropy"}}, "needs a discrete target"),
        ({"name": "simmim", "encoder_mode": "visible"}, "use head.type: conv_decoder, cross_attention, mae_decoder or predictor"),
        ({"name": "mae", "masking": {"mask_token_prob": 0.8}}, "need encoder_mode: mask_token"),
        (
            {"name": "simmim", "masking": {"mask_token_prob": 0.8, "random_token_prob": 0.3}},
            "exceeds 1",
        ),
        ({"name": "maskfeat", "loss": {"adv_weight": 0.1}}, "needs a pixel target"),
    ],
)
def test_recipe_axes_are_checked_when_the_config_is_read(rec, match):
    raw = {"kind": "pretrain", "recipe": rec}
    from harness.core.config import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_new_recipe_defaults_are_the_papers():
    beit = RecipeConfig(name="beit")
    assert (beit.masking.strategy, beit.masking.min_block_patches, beit.masking.min_aspect) == (
        "block",
        16,
        0.3,
    )
    assert round(beit.masking.ratio * 196) == 75 and beit.target.tokenizer.input_size == 112
    assert (beit.target.type, beit.target.tokenizer.vocab_size, beit.loss.type) == (
        "tokens",
        8192,
        "cross_entropy",
    )
    mpp = RecipeConfig(name="vit_mpp")
    assert (mpp.masking.ratio, mpp.masking.mask_token_prob, mpp.masking.random_token_prob) == (
        0.5,
        0.8,
        0.1,
    )
    assert (mpp.target.type, mpp.target.bins) == ("mean_color", 8)
    mf = RecipeConfig(name="maskfeat")
    assert (mf.target.hog.orientations, mf.target.hog.cell_size, mf.masking.ratio) == (9, 8, 0.4)
    ce = RecipeConfig(name="context_encoder")
    assert (ce.masking.strategy, ce.loss.type, ce.loss.adv_weight, ce.head.type) == (
        "central",
        "l2",
        0.001,
        "upconv",
    )
    swin = EncoderConfig(arch="swin_base_192")
    assert swin.timm_kwargs()["window_size"] == 6 and swin.family == "swin"


@pytest.mark.parametrize("case", ["beit_kmeans", "maskfeat", "context_encoder", "simmim_swin"])
def test_engine_runs_every_kind_of_recipe_and_resumes(tiny_imagefolder, tmp_path, case):
    arch, rec = CASES[case]
    train = {
        "epochs": 1,
        "warmup_epochs": 0,
        "batch_size": 4,
        "base_lr": 1e-3,
        "lr_base_batch": 4,
        "max_steps": 4,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "num_recon_images": 3,
    }
    cfg = PretrainConfig(
        data={"source": str(tiny_imagefolder)}, encoder={"arch": arch}, recipe=rec, train=train
    )
    logs: list[str] = []
    res = pretrain(cfg, tmp_path / "run", log=logs.append)
    assert res.steps == 4 and res.recon_path.is_file() and (tmp_path / "run" / ENCODER).is_file()
    from PIL import Image

    with Image.open(res.recon_path) as im:  # 4 rows of 3 pictures
        assert im.width > 3 * 32 and im.height > 4 * 32
    if case == "beit_kmeans":
        assert any("[tokenizer kmeans]" in m for m in logs)
        again: list[str] = []
        pretrain(cfg, tmp_path / "run", resume=True, log=again.append)
        assert any("resumed at step 4" in m for m in again)
        assert not any("[tokenizer" in m for m in again)  # restored from the checkpoint, not refit


def test_shipped_pretrain_configs_validate_and_build():
    from pathlib import Path

    from harness.core.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path, kind="pretrain")
        assert isinstance(cfg, PretrainConfig)
        if cfg.encoder.img_size <= 32:  # the CPU-sized ones: build the model too
            create_model(cfg.encoder, cfg.recipe)
