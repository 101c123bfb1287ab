"""ViT variants (relative position bias, layer scale, absolute position choices) export to timm's
matching model as a plain state dict (timm's ``Beit`` with relative position bias, its
``VisionTransformer`` otherwise) and import back with equal outputs; a pretrained variant's
encoder file does the same."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from checkpoint_layouts import feature_diff as _diff
from checkpoint_layouts import images as _x
from checkpoint_layouts import randomize as _randomize
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer

from downstream.checkpoints import export_encoder, load_checkpoint
from harness.core.config import EncoderConfig, PretrainConfig
from pretrain.encoders import create_encoder
from pretrain.engine import pretrain

VARIANTS = {
    "vit_layer_scale_no_pos": (dict(layer_scale=0.1, pos_embed="none"), VisionTransformer),
    "vit_layer_scale_learned": (dict(layer_scale=1e-5, pos_embed="learned"), VisionTransformer),
    "beit_shared": (dict(rel_pos_bias="shared", layer_scale=0.1, pos_embed="none"), Beit),
    "beit_per_block_sincos": (dict(rel_pos_bias="per_block", pos_embed="sincos"), Beit),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_exports_to_timms_model_and_imports_back(tmp_path, name):
    fields, timm_class = VARIANTS[name]
    cfg = EncoderConfig(arch="vit_micro_32", **fields)
    enc = _randomize(create_encoder(cfg), seed=1)
    export_encoder(enc, tmp_path / "out" / "enc")
    arch = json.loads((tmp_path / "out" / "enc.json").read_text())
    model = timm.create_model(arch["timm_name"], pretrained=False, **arch["timm_kwargs"])
    assert type(model) is timm_class
    state = torch.load(tmp_path / "out" / "enc.pth", weights_only=True)
    model.load_state_dict(state, strict=True)  # a plain timm state dict: every key, no extra
    with torch.no_grad():
        assert torch.allclose(model.eval().forward_features(_x()), enc.forward_features(_x()), atol=1e-6)
    for suffix in (".pth", ".safetensors"):
        got, rep = load_checkpoint(tmp_path / "out" / f"enc{suffix}")
        assert rep.family == "mimbench" and got.cfg == cfg and got.family == enc.family
        assert _diff(enc, got) == 0.0


def test_layer_scale_is_kept_not_folded_when_our_metadata_is_there(tmp_path):
    cfg = EncoderConfig(arch="vit_micro_32", layer_scale=0.1)
    enc = _randomize(create_encoder(cfg), seed=2)
    export_encoder(enc, tmp_path / "enc", formats=("safetensors",))
    got, _ = load_checkpoint(tmp_path / "enc.safetensors")
    assert torch.equal(got.vit.blocks[0].ls1.gamma, enc.vit.blocks[0].ls1.gamma)


def test_pretrained_variant_checkpoint_exports_and_imports_back(tiny_imagefolder, tmp_path):
    cfg = PretrainConfig(
        data={"source": str(tiny_imagefolder)}, encoder={"arch": "vit_micro_32"},
        recipe={"name": "simmim", "masking": {"mask_patch_size": 16}},
        train={"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4,
               "max_steps": 2, "num_recon_images": 0},
    )  # fmt: skip
    assert (cfg.encoder.rel_pos_bias, cfg.encoder.layer_scale, cfg.encoder.pos_embed) == (
        "shared", 0.1, "none",
    )  # SimMIM's ViT-B definition from the recipe file
    res = pretrain(cfg, tmp_path / "run", log=lambda m: None)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["encoder_definition"] == {
        "setup": "paper", "init": "simmim", "family": "beit", "pos_embed": "none",
        "rel_pos_bias": "shared", "layer_scale": 0.1,
        "init_source": summary["encoder_definition"]["init_source"],
    }  # fmt: skip
    enc, _ = load_checkpoint(res.encoder_path)
    export_encoder(enc, tmp_path / "exp" / "enc")
    arch = json.loads((tmp_path / "exp" / "enc.json").read_text())
    model = timm.create_model(
        arch["timm_name"], pretrained=False, checkpoint_path=str(tmp_path / "exp" / "enc.pth"),
        **arch["timm_kwargs"],
    ).eval()  # fmt: skip
    assert isinstance(model, Beit)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(_x()), enc.forward_features(_x()), atol=1e-6)
    again, _ = load_checkpoint(tmp_path / "exp" / "enc.safetensors")
    assert _diff(enc, again) == 0.0 and again.cfg == cfg.encoder
