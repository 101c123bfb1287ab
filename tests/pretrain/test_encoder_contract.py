"""The encoder contract, for every family in the ENCODERS registry (timm's habit: tests
parametrized over the registry, so every registered family is exercised).

Each family needs a tiny config in ``TINY``; a family registered without one fails
``test_every_registered_family_has_a_tiny_config``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from harness.core.config import EncoderConfig
from harness.core.registry import UnknownNameError
from pretrain.encoders import ENCODERS, Encoder, create_encoder, load_encoder

#: family -> (encoder config, options) of a tiny encoder that runs on a CPU in well under a second.
TINY: dict[str, tuple[EncoderConfig, dict[str, Any]]] = {
    "vit": (EncoderConfig(arch="vit_micro_32"), {}),
    "swin": (EncoderConfig(arch="swin_micro_32"), {}),
    "swinv2": (EncoderConfig(arch="swinv2_micro_32"), {}),
    "conv": (EncoderConfig(arch="ce_conv_32"), {}),
    "beit": (EncoderConfig(arch="vit_micro_32"), {"use_shared_rel_pos_bias": True}),
    # the layouts of published checkpoints (data2vec 2.0's post-norm ViT, I-JEPA's without cls)
    "vit_postnorm": (EncoderConfig(arch="vit_micro_32", pos_embed="learned"), {}),
    "vit_avgpool": (EncoderConfig(arch="vit_micro_32", pos_embed="learned"), {}),
    # iGPT's pixel-token transformer (its codebook set in _tiny; causal in tests/pretrain/test_igpt)
    "igpt": (EncoderConfig(arch="igpt_micro_8"), {}),
}

#: ViT variants (``EncoderConfig`` values; the family follows from the config): layer scale and
#: no absolute position on timm's ViT, relative position bias (shared / per block) on timm's Beit.
VARIANTS: dict[str, EncoderConfig] = {
    "vit_layer_scale_no_pos": EncoderConfig(arch="vit_micro_32", layer_scale=0.1, pos_embed="none"),
    "vit_learned_pos": EncoderConfig(arch="vit_micro_32", pos_embed="learned"),
    "beit_shared_layer_scale": EncoderConfig(
        arch="vit_micro_32", rel_pos_bias="shared", layer_scale=0.1, pos_embed="none"
    ),
    "beit_per_block_sincos": EncoderConfig(
        arch="vit_micro_32", rel_pos_bias="per_block", pos_embed="sincos"
    ),
}

FAMILIES = ENCODERS.names()
#: Every family's tiny config, then every variant.
CASES = FAMILIES + list(VARIANTS)
B = 2


def _untested_families() -> set[str]:
    return set(ENCODERS.names()) - set(TINY)


def _tiny(case: str, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    if case in VARIANTS:
        enc = create_encoder(VARIANTS[case])
    else:
        cfg, options = TINY[case]  # a KeyError here: give the new family a tiny config in TINY
        enc = create_encoder(cfg, case, options)
    with torch.no_grad():  # every weight away from its init (zeros, ones), so loads must matter
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if enc.tokenizes_pixels:  # a fitted colour-cluster codebook (the harness fits it in pretraining)
        enc.set_codebook(torch.rand(512, 3, generator=torch.Generator().manual_seed(seed)))
    return enc.eval()


def _images(enc: Encoder, seed: int = 1) -> torch.Tensor:
    size = int(enc.cfg.img_size)  # type: ignore[arg-type]
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(enc: Encoder, grid: tuple[int, int]) -> int:
    return enc.num_prefix_tokens + grid[0] * grid[1]


def test_every_registered_family_has_a_tiny_config():
    assert {"vit", "swin", "beit", "conv"} <= set(ENCODERS.names())
    assert not _untested_families(), f"families without a tiny config: {_untested_families()}"


def test_a_family_registered_without_a_tiny_config_is_caught(monkeypatch):
    class Unlisted(Encoder):
        family = "unlisted"

    monkeypatch.setitem(ENCODERS._items, "unlisted", Unlisted)
    assert _untested_families() == {"unlisted"}


def test_unknown_family_and_unknown_option_are_refused():
    cfg, _ = TINY["vit"]
    with pytest.raises(UnknownNameError, match="did you mean 'vit'"):
        create_encoder(cfg, "vitt")
    with pytest.raises(ValueError, match="unknown beit option"):
        create_encoder(cfg, "beit", {"layerscale": True})
    with pytest.raises(ValueError, match="unknown vit option"):
        create_encoder(cfg, "vit", {"layer_scale": True})


@pytest.mark.parametrize("family", FAMILIES)
def test_family_name_and_class_agree(family):
    enc = _tiny(family)
    assert enc.family == family and ENCODERS.get(family) is type(enc)


@pytest.mark.parametrize("case", CASES)
def test_output_shapes(case):
    enc = _tiny(case)
    x = _images(enc)
    gh, gw = enc.feature_grid
    assert enc.encoder_stride * gh == enc.cfg.img_size == enc.encoder_stride * gw
    with torch.no_grad():
        out = enc.forward_features(x)
        assert out.shape == (B, _tokens(enc, (gh, gw)), enc.num_features)
        assert torch.equal(enc(x), out)
        blocks = enc.forward_blocks(x)
        if enc.isotropic:  # one output per block, all on the output's grid
            assert len(blocks) == enc.num_layers
        assert enc.block_grid(len(blocks) - 1) == (gh, gw)
        for i, t in enumerate(blocks):
            assert t.shape[:2] == (B, _tokens(enc, enc.block_grid(i)))
        assert blocks[-1].shape == out.shape
        assert torch.allclose(enc.final_norm(blocks[-1]), out, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_feature_maps_for_dense_heads(case):
    enc = _tiny(case)
    x = _images(enc)
    n = len(enc.forward_blocks(x))
    with torch.no_grad():
        maps = enc.forward_intermediates(x, list(range(n)))
        normed = enc.forward_intermediates(x, [n - 1], norm=True)[0]
        out = enc.forward_features(x)
    assert len(maps) == n
    for i, m in enumerate(maps):
        assert m.shape[0] == B and tuple(m.shape[2:]) == enc.block_grid(i)
    assert maps[-1].shape[1] == enc.num_features
    # the normed last map is the output tokens, laid out on the grid
    tokens = normed.flatten(2).transpose(1, 2)  # [B, N, D]
    assert torch.allclose(tokens, out[:, enc.num_prefix_tokens :], atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_pooling_choices(case):
    enc = _tiny(case)
    x = _images(enc)
    with torch.no_grad():
        out = enc.forward_features(x)
        for p in enc.poolings:
            assert enc.pool(out, p).shape == (B, enc.num_features)
        assert torch.allclose(enc.pool(out, "avg"), out[:, enc.num_prefix_tokens :].mean(1))
        assert ("cls" in enc.poolings) == (enc.num_prefix_tokens > 0)
        if enc.num_prefix_tokens:
            assert torch.equal(enc.pool(out, "cls"), out[:, 0])
        else:
            with pytest.raises(ValueError, match="no class token"):
                enc.pool(out, "cls")
        with pytest.raises(ValueError, match="pools with"):
            enc.pool(out, "max")
        g = enc.global_pool(x)
        assert g.shape == (B, enc.num_features)
        if enc.num_prefix_tokens:  # MAE: patch tokens before the final norm, then fc_norm
            pre = enc.forward_blocks(x)[-1][:, enc.num_prefix_tokens :].mean(1)
            assert torch.allclose(enc.global_pool(x, nn.Identity()), pre, atol=1e-6)
            assert torch.allclose(g.mean(-1), torch.zeros(B), atol=1e-5)  # a LayerNorm, no affine
            assert not torch.allclose(g, enc.pool(out, "avg"), atol=1e-3)
        else:  # the family's own head: mean of the normed output tokens
            assert torch.equal(g, enc.pool(out, "avg"))


@pytest.mark.parametrize("case", CASES)
def test_last_blocks(case):
    enc = _tiny(case)
    x = _images(enc)
    k = enc.num_feature_blocks
    assert k == (enc.num_layers if enc.isotropic else 1)
    with torch.no_grad():
        got = enc.last_blocks(x, k)
        out = enc.forward_features(x)
    assert len(got) == k and all(t.shape == out.shape for t in got)
    assert torch.allclose(got[-1], out, atol=1e-5)
    if k > 1:
        assert not torch.allclose(got[0], got[-1], atol=1e-3)
    with pytest.raises(ValueError, match="use last_blocks"):
        enc.last_blocks(x, k + 1)


@pytest.mark.parametrize("case", CASES)
def test_layer_ids_monotone_and_in_range(case):
    enc = _tiny(case)
    names = [n for n, _ in enc.named_parameters()]
    top = enc.num_layers + 1
    assert all(0 <= enc.layer_id(n) <= top for n in names)
    assert all(enc.layer_id(n) == enc.layer_id(f"encoder.{n}") for n in names)
    # along the trunk's parameters (registration order = depth order) ids never go down
    prefix = next(k for k, m in enc.named_modules() if m is enc.trunk)
    trunk = [f"{prefix}.{n}" if prefix else n for n, _ in enc.trunk.named_parameters()]
    ids = [enc.layer_id(n) for n in trunk]
    assert ids == sorted(ids) and ids[0] <= 1 and ids[-1] >= enc.num_layers
    assert len(set(ids)) >= enc.num_layers  # every block has its own group
    assert len(enc.residual_blocks()) in (0, enc.num_layers)


@pytest.mark.parametrize("case", CASES)
def test_no_weight_decay_names_are_parameters(case):
    enc = _tiny(case)
    assert set(enc.no_weight_decay()) <= {n for n, _ in enc.named_parameters()}


def _patch_pixels(enc: Encoder, k: int) -> tuple[slice, slice]:
    p, gw = enc.patch_size, enc.grid_size[1]
    r, c = divmod(k, gw)
    return slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)


@pytest.mark.parametrize("case", CASES)
def test_masked_forward_hides_exactly_the_masked_patches(case):
    enc = _tiny(case)
    x = _images(enc)
    mask = torch.zeros(B, enc.num_patches, dtype=torch.bool)
    masked, kept = [1, enc.num_patches - 2], 0
    mask[:, masked] = True
    x_masked_changed, x_kept_changed = x.clone(), x.clone()
    for k in masked:
        x_masked_changed[(..., *_patch_pixels(enc, k))] += 3.0
    x_kept_changed[(..., *_patch_pixels(enc, kept))] += 3.0
    with torch.no_grad():
        ref = enc.forward_features(x, mask)
        assert torch.allclose(enc.forward_features(x, torch.zeros_like(mask)), enc(x), atol=1e-6)
        assert not torch.allclose(ref, enc(x), atol=1e-4)  # the mask changes the output
        assert torch.allclose(enc.forward_features(x_masked_changed, mask), ref, atol=1e-5)
        assert not torch.allclose(enc(x_masked_changed), enc(x), atol=1e-4)  # unmasked: seen
        assert not torch.allclose(enc.forward_features(x_kept_changed, mask), ref, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_visible_only_and_token_forwards(case):
    enc = _tiny(case)
    x = _images(enc)
    mask = torch.zeros(B, enc.num_patches, dtype=torch.bool)
    mask[:, :3] = True
    ids_all = torch.arange(enc.num_patches).expand(B, -1)
    with torch.no_grad():
        if enc.visible_only:
            assert torch.allclose(enc.forward_visible(x, ids_all), enc(x), atol=1e-5)
            assert enc.forward_visible(x, ids_all[:, :5]).shape[1] == enc.num_prefix_tokens + 5
        else:
            with pytest.raises(ValueError, match="encoder_mode: mask_token"):
                enc.forward_visible(x, ids_all)
        if enc.token_input:
            t = enc.patch_tokens(x)
            assert t.shape == (B, enc.num_patches, enc.embed_dim)
            assert torch.allclose(enc.forward_tokens(t, mask), enc(x, mask), atol=1e-5)
        else:
            with pytest.raises(ValueError, match="patch embeddings"):
                enc.patch_tokens(x)


@pytest.mark.parametrize("case", CASES)
def test_patchify_round_trip(case):
    enc = _tiny(case)
    x = _images(enc)
    p = enc.patchify(x)
    assert p.shape == (B, enc.num_patches, enc.patch_size**2 * 3)
    assert torch.equal(enc.unpatchify(p), x)


@pytest.mark.parametrize("case", CASES)
def test_save_then_load_gives_equal_outputs(case, tmp_path):
    enc = _tiny(case, seed=0)
    path = tmp_path / f"{case}.pth"
    enc.save_timm(path, meta={"recipe": "test"})
    again = load_encoder(path)
    assert type(again) is type(enc) and again.options == enc.options
    x = _images(enc)
    other = _tiny(case, seed=5)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), enc(x))
        assert not torch.allclose(other(x), enc(x), atol=1e-4)  # the weights are what matter
    meta = torch.load(path, weights_only=True)["mimbench"]
    assert meta == enc.file_meta({"recipe": "test"})
    assert meta["family"] == enc.family and meta["encoder"] == enc.cfg.model_dump(mode="json")


# --------------------------------------------------------------------------- ViT variants


def test_variant_config_picks_the_family_and_the_timm_model():
    ls = _tiny("vit_layer_scale_no_pos")
    assert ls.family == "vit" and ls.vit.pos_embed is None
    assert all(float(b.ls1.gamma.detach().mean()) != 0 for b in ls.vit.blocks)
    name, kwargs = ls.timm_architecture()
    assert kwargs["init_values"] == 0.1 and kwargs["pos_embed"] == "none"
    shared = create_encoder(VARIANTS["beit_shared_layer_scale"])
    assert shared.family == "beit" and shared.beit.pos_embed is None
    assert shared.beit.rel_pos_bias is not None and shared.beit.blocks[0].attn.relative_position_bias_table is None
    assert torch.equal(shared.beit.blocks[1].gamma_2.detach(), torch.full((32,), 0.1))
    per_block = create_encoder(VARIANTS["beit_per_block_sincos"])
    assert per_block.beit.rel_pos_bias is None and per_block.beit.blocks[0].gamma_1 is None
    assert not per_block.beit.pos_embed.requires_grad  # fixed sin-cos, as the ViT's
    assert float(per_block.beit.pos_embed[0, 0].abs().max()) == 0.0


def test_variant_no_weight_decay_holds_tables_and_gammas():
    nwd = _tiny("beit_shared_layer_scale").no_weight_decay()
    assert "beit.rel_pos_bias.relative_position_bias_table" in nwd
    assert {"beit.blocks.0.gamma_1", "beit.blocks.1.gamma_2"} <= nwd and "beit.pos_embed" not in nwd
    assert "vit.blocks.1.ls2.gamma" in _tiny("vit_layer_scale_no_pos").no_weight_decay()
    per_block = _tiny("beit_per_block_sincos").no_weight_decay()
    assert "beit.blocks.1.attn.relative_position_bias_table" in per_block


def test_variant_position_choices_change_the_output():
    x = _images(_tiny("vit"))
    with torch.no_grad():
        # no absolute position: permuting the patches permutes the patch tokens
        enc = _tiny("vit_layer_scale_no_pos")
        perm = torch.randperm(enc.num_patches, generator=torch.Generator().manual_seed(0))
        t = enc.patch_tokens(x)
        out = enc.forward_tokens(t)
        assert torch.allclose(enc.forward_tokens(t[:, perm])[:, 1:], out[:, 1 + perm], atol=1e-5)
        # relative position bias: not permutation-equivariant, though no absolute position
        rel = _tiny("beit_shared_layer_scale")
        p = rel.patchify(x)
        shuffled = rel.unpatchify(p[:, perm])
        assert not torch.allclose(rel(shuffled)[:, 1:], rel(x)[:, 1 + perm], atol=1e-4)


def test_visible_only_with_relative_position_bias_is_refused_clearly():
    enc = _tiny("beit_shared_layer_scale")
    ids = torch.arange(enc.num_patches).expand(B, -1)
    with pytest.raises(ValueError, match="relative position bias needs the full grid"):
        enc.forward_visible(_images(enc), ids)


def test_options_that_contradict_a_variant_config_are_refused():
    cfg = VARIANTS["beit_shared_layer_scale"]
    with pytest.raises(ValueError, match="contradict the encoder config"):
        create_encoder(cfg, "beit", {"use_rel_pos_bias": True, "use_shared_rel_pos_bias": False})
    with pytest.raises(ValueError, match="rel_pos_bias / layer_scale are ViT variants"):
        EncoderConfig(arch="swin_micro_32", layer_scale=0.1)


def test_plain_values_are_left_out_of_dumps():
    plain = EncoderConfig(arch="vit_micro_32").model_dump()
    assert "rel_pos_bias" not in plain and "layer_scale" not in plain  # hashes kept
    dumped = VARIANTS["beit_shared_layer_scale"].model_dump()
    assert dumped["rel_pos_bias"] == "shared" and dumped["layer_scale"] == 0.1
    assert EncoderConfig.model_validate(dumped) == VARIANTS["beit_shared_layer_scale"]


def test_records_name_a_variants_definition():
    from pretrain.encoders.arch import arch_label

    assert arch_label(VARIANTS["beit_shared_layer_scale"]) == (
        "vit_micro_32(pos_embed=none, rel_pos_bias=shared, layer_scale=0.1)"
    )
    assert arch_label(VARIANTS["vit_learned_pos"]) == "vit_micro_32"  # not a variant: as before
