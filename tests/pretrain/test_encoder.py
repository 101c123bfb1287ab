"""The encoder wrapper: visible-only vs full forward, mask token, timm round trip, sin-cos."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.core.config import EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoders import load_encoder
from pretrain.encoders.arch import arch_label
from pretrain.encoders.vit import ViTEncoder, sincos_pos_embed_2d


@pytest.fixture
def enc() -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(EncoderConfig(arch="vit_micro_32")).eval()


def test_sincos_values_by_hand():
    pe = sincos_pos_embed_2d(8, 2, 3)  # grid h=2, w=3; quarters: sin(x), cos(x), sin(y), cos(y)
    assert pe.shape == (6, 8)
    for idx, (y, x) in enumerate([(y, x) for y in range(2) for x in range(3)]):
        for i, omega in enumerate([1.0, 1.0 / 100.0]):  # 1 / 10000^(i / 2)
            assert math.isclose(pe[idx, i], math.sin(x * omega), abs_tol=1e-6)
            assert math.isclose(pe[idx, 2 + i], math.cos(x * omega), abs_tol=1e-6)
            assert math.isclose(pe[idx, 4 + i], math.sin(y * omega), abs_tol=1e-6)
            assert math.isclose(pe[idx, 6 + i], math.cos(y * omega), abs_tol=1e-6)


def test_visible_forward_with_all_tokens_equals_full_forward(enc):
    x = torch.randn(2, 3, 32, 32)
    ids_all = torch.arange(enc.num_patches).expand(2, -1)
    assert torch.allclose(enc.forward_visible(x, ids_all), enc.forward_features(x), atol=1e-5)


def test_visible_forward_equals_blocks_on_the_same_tokens(enc):
    x = torch.randn(2, 3, 32, 32)
    ids_keep = torch.tensor([[0, 5, 9, 15], [3, 4, 10, 12]])
    got = enc.forward_visible(x, ids_keep)
    # independent path: timm's own patch embed + pos embed, pick the tokens, run timm's blocks
    vit = enc.vit
    t = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    t = torch.stack([t[i, ids_keep[i]] for i in range(2)])
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1)
    ref = vit.norm(vit.blocks(torch.cat([cls, t], 1)))
    assert torch.allclose(got, ref, atol=1e-5)
    # attention is permutation-equivariant: permuting the kept ids permutes the outputs
    perm = torch.tensor([2, 0, 3, 1])
    got_p = enc.forward_visible(x, ids_keep[:, perm])
    assert torch.allclose(got_p[:, 1:], got[:, 1:][:, perm], atol=1e-5)


def test_mask_token_replaces_masked_patch_embeddings(enc):
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, enc.num_patches, dtype=torch.bool)
    mask[0, [1, 7]] = True
    tok = enc.embed(x, mask)
    pe = enc.vit.pos_embed[0, 1:]
    assert torch.allclose(tok[0, 1 + 1], enc.mask_token[0, 0] + pe[1], atol=1e-6)
    assert torch.allclose(tok[0, 1 + 7], enc.mask_token[0, 0] + pe[7], atol=1e-6)
    x2 = x.clone()
    x2[..., :8, 8:16] = 100.0  # patch 1 changes: masked, so its token must not
    assert torch.allclose(enc.embed(x2, mask)[0, 2], tok[0, 2])
    assert not torch.allclose(enc.embed(x2)[0, 2], enc.embed(x)[0, 2])


def test_saved_encoder_loads_into_timm_with_identical_outputs(enc, tmp_path):
    path = tmp_path / "encoder.pth"
    enc.save_timm(path)
    cfg = enc.cfg
    model = timm.create_model(cfg.timm_name, checkpoint_path=str(path), **cfg.timm_kwargs()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc.forward_features(x), atol=1e-6)
    again = load_encoder(path).eval()
    with torch.no_grad():
        assert torch.equal(again.forward_features(x), enc.forward_features(x))


def test_checkpoint_that_does_not_fit_is_refused_with_the_fix(enc, tmp_path):
    path = tmp_path / "encoder.pth"
    enc.save_timm(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    other = ViTEncoder(EncoderConfig(arch="vit_micro_32", embed_dim=48, num_heads=2))
    with pytest.raises(CheckpointError, match="does not fit.*shape mismatches.*Fix"):
        other.load_timm_state_dict(state, str(path))
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(tmp_path / "missing.pth")


class _Arbitrary:
    """An object only full unpickling can rebuild."""


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "obj": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_encoder(path)


def test_layer_ids_and_intermediates(enc):
    names = dict(enc.named_parameters())
    assert enc.layer_id("vit.patch_embed.proj.weight") == 0
    assert enc.layer_id("mask_token") == 0
    assert enc.layer_id("vit.blocks.1.attn.qkv.weight") == 2
    assert enc.layer_id("vit.norm.weight") == enc.num_layers + 1
    assert all(0 <= enc.layer_id(n) <= enc.num_layers + 1 for n in names)
    feats = enc.forward_intermediates(torch.randn(1, 3, 32, 32), [0, 1])
    assert [tuple(f.shape) for f in feats] == [(1, 32, 4, 4)] * 2


def test_wrong_input_size_is_explained(enc):
    with pytest.raises(ValueError, match="expects 32x32 images"):
        enc(torch.randn(1, 3, 64, 64))


def test_a_named_config_must_be_the_files_own(tmp_path):
    """The file's metadata says what it is; a named config that differs is refused, not used."""
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_tiny_32", num_heads=2)).eval()
    path = tmp_path / "encoder.pth"
    enc.save_timm(path)
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 2 vs named 4"):
        load_encoder(path, EncoderConfig(arch="vit_tiny_32"))
    with pytest.raises(CheckpointError, match="img_size: checkpoint 32 vs named 48"):
        load_encoder(path, EncoderConfig(arch="vit_tiny_32", num_heads=2, img_size=48))
    again = load_encoder(path, EncoderConfig(arch="vit_tiny_32", num_heads=2)).eval()
    assert again.vit.blocks[0].attn.num_heads == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.forward_features(x), enc.forward_features(x))
    plain = tmp_path / "plain.pth"
    torch.save(enc.timm_state_dict(), plain)
    with pytest.raises(CheckpointError, match="architecture is unknown.*--arch"):
        load_encoder(plain)


def test_arch_label_names_every_value_off_the_preset():
    assert arch_label(EncoderConfig(arch="vit_tiny_32")) == "vit_tiny_32"
    assert arch_label(EncoderConfig(arch="vit_tiny_32", pos_embed="learned")) == "vit_tiny_32"
    label = arch_label(EncoderConfig(arch="vit_tiny_32", num_heads=2, depth=3, img_size=48))
    assert label == "vit_tiny_32(depth=3, num_heads=2, img_size=48)"


@pytest.mark.parametrize(
    "arch, millions",
    # the Swin repo's MODELHUB.md, "SimMIM Pretrained Swin-V2 Models" (backbone weights only):
    # SwinV2-Base 87M, SwinV2-Huge 655M
    [("swinv2_base_192", 87), ("swinv2_huge_192", 655)],
)
def test_swinv2_presets_have_the_released_backbone_sizes(arch, millions):
    """Built on the meta device (no memory): the backbone's parameters, rounded to millions,
    are the released size, so the preset's width and stage depths are the release's."""
    from pretrain.encoders import create_encoder

    with torch.device("meta"):
        enc = create_encoder(EncoderConfig(arch=arch))
    assert round(sum(p.numel() for p in enc.parameters()) / 1e6) == millions
