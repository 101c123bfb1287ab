"""The latent-target families' releases (data2vec 2.0, I-JEPA, iBOT, CAE, BEiT v2): each layout,
synthesized from a micro encoder with known weights, imports into an encoder whose every
task-facing contract method computes the source's; a key the layout does not know is refused by
name; the imported encoders are read by every task (or refused clearly by the dense ones)."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from checkpoint_layouts import (
    MICRO,
    beit2_layout,
    cae_layout,
    data2vec2_layout,
    ibot_layout,
    ijepa_layout,
    images,
    random_beit,
    random_released,
    random_vit,
    randomize,
)

from downstream.base import TaskContext, get_task
from downstream.checkpoints import export_encoder, load_checkpoint
from harness.core.config import ConfigError, DataConfig, EncoderConfig, parse_task_config
from harness.core.errors import CheckpointError
from pretrain.encoders import load_encoder
from pretrain.encoders.beit import BeitEncoder
from pretrain.encoders.released import PostNormBlock


def _cae_source() -> BeitEncoder:
    opts = {"use_abs_pos_emb": True, "use_rel_pos_bias": False,
            "use_shared_rel_pos_bias": False, "layer_scale": True, "qkv_bias": True}  # fmt: skip
    return randomize(BeitEncoder(MICRO, opts), 34)


def _release(name: str) -> tuple:
    """``(source encoder, checkpoint object, load kwargs, the family it imports as)``."""
    if name == "data2vec2":
        d2v = random_released("vit_postnorm", seed=31)
        return d2v, data2vec2_layout(d2v), {"cfg": MICRO}, "vit_postnorm"
    if name == "ijepa":
        ijepa = random_released("vit_avgpool", seed=32)
        return ijepa, ijepa_layout(ijepa), {"cfg": MICRO}, "vit_avgpool"
    if name == "ibot":
        ibot = random_vit(seed=33)
        return ibot, ibot_layout(ibot), {"cfg": MICRO}, "vit"
    if name == "cae":
        cae = _cae_source()
        return cae, cae_layout(cae), {"cfg": MICRO}, "beit"
    beit2 = random_beit(shared=True, seed=35)
    return beit2, beit2_layout(beit2), {}, "beit"


RELEASES = ["data2vec2", "ijepa", "ibot", "cae", "beit2"]
#: Releases with an encoder-side mask token (the others drop masked patches, or mask in the
#: regressor; iBOT's evaluated teacher is built without one): only their masked forward is the
#: source's.
WITH_MASK_TOKEN = ("beit2",)


def _contract_outputs(enc: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every task-facing output of the encoder contract on a fixed batch (and a fixed mask)."""
    x = images()
    mask = torch.zeros(2, enc.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    enc.eval()
    with torch.no_grad():
        tokens = enc.forward_features(x)
        out = {"features": tokens, "masked": enc.forward_features(x, mask),
               "global_pool": enc.global_pool(x)}  # fmt: skip
        out.update({f"pool_{p}": enc.pool(tokens, p) for p in enc.poolings})
        out.update({f"block_{i}": t for i, t in enumerate(enc.forward_blocks(x))})
        out.update({f"last_{i}": t for i, t in enumerate(enc.last_blocks(x, 2))})
        maps = enc.forward_intermediates(x, [0, 1], norm=True)
        out.update({f"map_{i}": t for i, t in enumerate(maps)})
    return out


@pytest.mark.parametrize("name", RELEASES)
def test_release_imports_with_every_contract_output_equal(name, tmp_path):
    source, obj, kwargs, family = _release(name)
    path = tmp_path / f"{name}.pth"
    torch.save(obj, path)
    got, rep = load_checkpoint(path, **kwargs)
    assert rep.detected == rep.family == name and rep.target == family == got.family
    assert not rep.missing and not rep.unexpected and not rep.partial
    ref, out = _contract_outputs(source), _contract_outputs(got)
    assert set(out) == set(ref)
    if name not in WITH_MASK_TOKEN:
        ref.pop("masked")
    for key in ref:
        assert out[key].shape == ref[key].shape, key
        assert torch.allclose(out[key], ref[key], rtol=0, atol=1e-5), (key, name)
    if name != "ijepa":  # I-JEPA's target_encoder holds the encoder alone
        assert rep.dropped, "the release's non-encoder parts are listed as dropped"


def test_imports_take_the_teacher_the_releases_evaluate(tmp_path):
    """iBOT's ``teacher`` over its ``student``, I-JEPA's ``target_encoder`` over ``encoder``."""
    for name in ("ibot", "ijepa"):
        source, obj, kwargs, _ = _release(name)
        torch.save(obj, tmp_path / "x.pth")
        _, rep = load_checkpoint(tmp_path / "x.pth", **kwargs)
        assert rep.container == {"ibot": "teacher", "ijepa": "target_encoder"}[name]


def test_ibot_mask_token_maps_when_the_teacher_holds_one(tmp_path):
    """``masked_embed`` ``[1, D]`` becomes the encoder's ``[1, 1, D]`` mask token; the released
    teacher has none (only the student is built with ``masked_im_modeling``)."""
    source = random_vit(seed=33)
    assert "backbone.masked_embed" not in ibot_layout(source)["teacher"]
    torch.save(ibot_layout(source, teacher_mask_token=True), tmp_path / "x.pth")
    got, rep = load_checkpoint(tmp_path / "x.pth", cfg=MICRO)
    assert rep.detected == "ibot" and not rep.missing and not rep.unexpected
    assert torch.equal(got.mask_token.detach(), source.mask_token.detach().reshape(1, 1, -1))
    ref, out = _contract_outputs(source), _contract_outputs(got)
    assert torch.allclose(out["masked"], ref["masked"], rtol=0, atol=1e-5)


def test_pooling_follows_the_class_token():
    """I-JEPA's encoder has no class token: it pools by averaging and refuses ``cls``."""
    enc = random_released("vit_avgpool", seed=1)
    tokens = enc.forward_features(images())
    assert enc.poolings == ("avg",) and tokens.shape[1] == enc.num_patches
    assert torch.equal(enc.pool(tokens, "avg"), tokens.mean(dim=1))
    with pytest.raises(ValueError, match="no class token"):
        enc.pool(tokens, "cls")
    assert random_released("vit_postnorm", seed=1).poolings == ("cls", "avg")


def test_post_norm_block_is_the_hand_formula():
    """``x = LN1(x + attn(x)); x = LN2(x + mlp(x))`` (data2vec 2.0's ``AltBlock``), by hand."""
    torch.manual_seed(0)
    blk = randomize(PostNormBlock(dim=8, num_heads=2, mlp_ratio=2.0, qkv_bias=True), 3)
    x = torch.randn(2, 5, 8)
    q, k, v = (blk.attn.qkv(x).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4))  # [B, H, T, 4]
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # 1 / sqrt(4)
    a = blk.attn.proj(att.transpose(1, 2).reshape(2, 5, 8))

    def ln(t: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(t, (8,), norm.weight, norm.bias, norm.eps)

    h = ln(x + a, blk.norm1)
    mlp = blk.mlp.fc2(F.gelu(blk.mlp.fc1(h)))
    with torch.no_grad():
        assert torch.allclose(blk(x), ln(h + mlp, blk.norm2), atol=1e-6)


def test_data2vec2_class_token_gets_no_position_and_norm_precedes_the_blocks():
    enc = random_released("vit_postnorm", seed=4)
    x = images()
    with torch.no_grad():
        t = enc.vit.patch_embed(x) + enc.vit.pos_embed  # positions: the patches only
        t = torch.cat([enc.vit.cls_token.expand(2, -1, -1), t], dim=1)
        t = enc.vit.norm_pre(t)
        for blk in enc.vit.blocks:
            t = blk(t)
        assert enc.vit.pos_embed.shape == (1, enc.num_patches, 32)
        assert torch.allclose(enc.forward_features(x), t, atol=1e-6)  # no final norm


@pytest.mark.parametrize("name", RELEASES)
def test_a_key_the_layout_does_not_know_is_refused_by_name(name, tmp_path):
    _, obj, kwargs, _ = _release(name)
    container = {"ibot": "teacher", "ijepa": "target_encoder"}.get(name, "model")
    prefix = "module." if name == "ijepa" else ""
    obj[container][f"{prefix}mystery_adapter.weight"] = torch.randn(4)
    torch.save(obj, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="mystery_adapter"):
        load_checkpoint(tmp_path / "x.pth", **kwargs)


def test_data2vec2_register_tokens_are_refused(tmp_path):
    enc = random_released("vit_postnorm", seed=5)
    obj = data2vec2_layout(enc)
    obj["model"]["modality_encoders.IMAGE.extra_tokens"] = torch.randn(1, 4, 32)
    torch.save(obj, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="one class token and no register tokens"):
        load_checkpoint(tmp_path / "x.pth", cfg=MICRO)


def test_ijepa_position_embedding_without_a_class_entry_is_resized(tmp_path):
    enc = random_released("vit_avgpool", seed=6)
    torch.save(ijepa_layout(enc), tmp_path / "x.pth")
    got, rep = load_checkpoint(tmp_path / "x.pth", cfg=MICRO.model_copy(update={"img_size": 48}))
    assert got.vit.pos_embed.shape == (1, 36, 32)
    assert any("pos_embed resized 4x4 -> 6x6" in n for n in rep.notes)
    assert got.forward_features(images(size=48)).shape == (2, 36, 32)


def test_widths_without_a_named_arch_assume_the_public_head_count(tmp_path):
    cfg = EncoderConfig(arch="vit_micro_32", embed_dim=192, num_heads=3, pos_embed="learned")
    from pretrain.encoders import create_encoder

    enc = randomize(create_encoder(cfg, "vit_avgpool"), 7)
    torch.save(ijepa_layout(enc), tmp_path / "x.pth")
    got, rep = load_checkpoint(tmp_path / "x.pth")
    assert got.cfg.num_heads == 3 and got.cfg.img_size == 32 and rep.assumed


@pytest.mark.parametrize("family", ["vit_postnorm", "vit_avgpool"])
def test_released_families_export_and_load_back(family, tmp_path):
    enc = random_released(family, seed=8)
    export_encoder(enc, tmp_path / "enc")
    for suffix in (".pth", ".safetensors"):
        got, rep = load_checkpoint(tmp_path / f"enc{suffix}")
        assert rep.family == "mimbench" and got.family == family and got.options == enc.options
        assert torch.equal(got.forward_features(images()), enc.forward_features(images()))
    enc.save_timm(tmp_path / "file.pth")
    again = load_encoder(tmp_path / "file.pth")
    assert again.family == family and torch.equal(
        again.forward_features(images()), enc.forward_features(images())
    )
    arch = json.loads((tmp_path / "enc.json").read_text())
    if family == "vit_avgpool":  # timm rebuilds it from the sidecar
        model = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
        model.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True), strict=True)
        with torch.no_grad():
            assert torch.allclose(model.eval().forward_features(images()),
                                  enc.forward_features(images()), atol=1e-6)  # fmt: skip
    else:
        assert arch["timm_name"] == ""  # timm has no post-norm ViT block


@pytest.mark.parametrize("name", ["data2vec2", "ijepa"])
@pytest.mark.parametrize("task", ["linear_probe", "knn"])
def test_every_task_reads_an_imported_release(name, task, tiny_imagefolder, tmp_path):
    source, obj, kwargs, _ = _release(name)
    torch.save(obj, tmp_path / "x.pth")
    enc, _ = load_checkpoint(tmp_path / "x.pth", **kwargs)
    config = {"linear_probe": {"lrs": [0.1], "epochs": 1, "batch_size": 8, "cache_features": False},
              "knn": {"k": 3, "extra_k": [], "cache_features": False}}[task]  # fmt: skip
    if task == "knn" and "cls" not in enc.poolings:  # I-JEPA: knn's default cls is refused
        config["pooling"] = "avg"
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    ctx = TaskContext(data=DataConfig(source=str(tiny_imagefolder), eval_crop_pct=1.0), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path / "out", log=lambda m: None)  # fmt: skip
    res = get_task(task).run(enc, parse_task_config({"name": task, **config}), ctx)
    assert set(res.metrics) == set(get_task(task).metrics)
    assert all(math.isfinite(v) for v in res.metrics.values())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


@pytest.mark.parametrize("family", ["vit_postnorm", "vit_avgpool"])
def test_dense_tasks_refuse_the_released_families_clearly(family):
    from downstream._mm.dense import dense_family

    enc = random_released(family, seed=9)
    for task in ("detection", "segmentation"):
        with pytest.raises(ConfigError, match=f"a {family} encoder, which has no dense backbone"):
            dense_family(enc, task)
