"""Encoder initialisation rules (``recipe.encoder_init``) against their formulas.

Each rule's weight statistics are compared with the reference code's formula, on a mid-sized
encoder (width 384) so that every std estimate is within a few percent: xavier-uniform's
``sqrt(2 / (fan_in + fan_out))``, BEiT's normal(0.02) truncated at +-0.02 (std 0.02 x 0.5399,
the variance of a standard normal cut at +-1 computed here from its density) and its
``1 / sqrt(2 l)`` rescale of block ``l``'s output layers.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.config import ENCODER_INITS, EncoderConfig, PretrainConfig, RecipeConfig
from pretrain.encoders import Encoder, create_encoder
from pretrain.model import MIMModel

#: A mid-sized ViT: 384 wide, so every weight matrix holds >= 147k values (qkv: 442k).
MID = dict(arch="vit_small_16", img_size=64, depth=3)
D = 384


def _cut_std(c: float) -> float:
    """Std of a standard normal truncated to [-c, c] (its density and cdf, no sampling)."""
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(c / math.sqrt(2))
    return math.sqrt(1 - 2 * c * phi / mass)


def _built(init: str, seed: int = 0, **enc) -> Encoder:
    torch.manual_seed(seed)
    encoder = create_encoder(EncoderConfig(**{**MID, **enc}))
    rule = ENCODER_INITS.get(init)
    rule.check_family(init, encoder.family)
    rule.apply(encoder)
    return encoder


def _std(t: torch.Tensor) -> float:
    return float(t.detach().double().std())


def _max(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def _close(measured: float, expected: float, rel: float = 0.03) -> bool:
    return abs(measured - expected) <= rel * expected


def test_truncated_std_formula():
    assert _cut_std(1.0) == pytest.approx(0.5396, abs=1e-4)  # tables: 0.53956
    assert _cut_std(100.0) == pytest.approx(1.0)


def test_mae_rule_is_xavier_uniform_everywhere():
    enc = _built("mae")
    parts = enc.init_parts()
    pe = parts.patch_embed.weight  # [D, 3, 16, 16] as a [D, 768] matrix
    fan_in = pe[0].numel()
    assert _close(_std(pe), math.sqrt(2 / (fan_in + D)))
    for blk in enc.vit.blocks:
        for lin, (fi, fo) in (
            (blk.attn.qkv, (D, 3 * D)),
            (blk.attn.proj, (D, D)),
            (blk.mlp.fc1, (D, 4 * D)),
            (blk.mlp.fc2, (4 * D, D)),
        ):
            bound = math.sqrt(6 / (fi + fo))
            assert _close(_std(lin.weight), math.sqrt(2 / (fi + fo))), lin
            assert _max(lin.weight) <= bound  # uniform on [-bound, bound]
            assert _max(lin.weight) > 0.99 * bound
            assert _max(lin.bias) == 0.0
        assert torch.equal(blk.norm1.weight, torch.ones(D)) and _max(blk.norm1.bias) == 0
    assert _close(_std(parts.class_token), 0.02, rel=0.12)  # 384 values: ~4% standard error
    assert _close(_std(parts.mask_token), 0.02, rel=0.12)


def test_timm_rule_keeps_timms_init_and_default_is_its_old_name():
    a, b = _built("timm", seed=3), _built("default", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    blk = a.vit.blocks[-1]
    # timm's ViT: trunc-normal(0.02) (cut at +-2, i.e. normal) on every linear layer, unscaled
    for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc2):
        assert _close(_std(lin.weight), 0.02)
    assert _std(a.vit.cls_token) < 1e-5  # timm: normal(1e-6)


@pytest.mark.parametrize(
    "init, cut",
    # BEiT cuts at +-std; SimMIM and data2vec use a cut at +-2 (100 std)
    [("beit", 1.0), ("simmim", 100.0), ("data2vec", 100.0)],
)
def test_beit_and_simmim_rules_rescale_block_outputs(init, cut):
    beit = dict(rel_pos_bias="shared", layer_scale=0.1, pos_embed="none")
    enc = _built(init, **beit)
    assert enc.family == "beit"
    base = 0.02 * _cut_std(cut)
    parts = enc.init_parts()
    if init == "data2vec":  # data2vec_vision.py builds the patch embedding outside its encoder
        built = _built("timm", **beit).init_parts().patch_embed  # the same seed, left as built
        assert torch.equal(parts.patch_embed.weight, built.weight)
    else:
        assert _close(_std(parts.patch_embed.weight), base)
        assert _max(parts.patch_embed.bias) == 0.0
    for layer_id, blk in enumerate(enc.beit.blocks, start=1):
        scale = 1 / math.sqrt(2 * layer_id)
        assert _close(_std(blk.attn.qkv.weight), base)
        assert _close(_std(blk.mlp.fc1.weight), base)
        assert _close(_std(blk.attn.proj.weight), base * scale), layer_id
        assert _close(_std(blk.mlp.fc2.weight), base * scale), layer_id
        if cut == 1.0:
            assert _max(blk.attn.proj.weight) <= 0.02 * scale + 1e-9
        assert torch.allclose(blk.gamma_1, torch.full((D,), 0.1))  # layer scale untouched
    table = enc.beit.rel_pos_bias.relative_position_bias_table
    assert _max(table) == 0.0  # BEiT's tables start at zero
    assert _close(_std(parts.class_token), base, rel=0.12)


def test_ijepa_rule_is_truncated_normal_without_rescale():
    """I-JEPA's ``helper.py`` ``init_model`` re-initialises every linear layer trunc-normal(0.02)
    after the model's own ``fix_init_weight``, so no block is rescaled; the patch-embedding conv
    keeps the model's trunc-normal(0.02) with a zero bias."""
    enc = _built("ijepa", seed=1)
    parts = enc.init_parts()
    assert _close(_std(parts.patch_embed.weight), 0.02)
    assert _max(parts.patch_embed.bias) == 0.0
    for blk in enc.vit.blocks:
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert _close(_std(lin.weight), 0.02), lin
            assert _max(lin.bias) == 0.0
    # the last block's fc2 would be 0.02 / sqrt(6) ~ 0.0082 under a rescale
    assert _std(enc.vit.blocks[-1].mlp.fc2.weight) > 0.019
    assert _close(_std(parts.class_token), 0.02, rel=0.12)


def test_simmim_rule_on_swinv2_zeroes_the_residual_post_norms():
    """The Swin repo's SwinV2: ``_init_weights`` (trunc-normal 0.02 linears, LayerNorms 1 / 0),
    then ``_init_respostnorm`` sets every block's norm1 / norm2 to zero; the final and patch
    norms stay at 1 / 0; no residual rescale."""
    torch.manual_seed(0)
    enc = create_encoder(EncoderConfig(arch="swinv2_tiny_256", img_size=64))
    for b in enc.residual_blocks():  # disturb them, so the rule must set them
        b.norm1.weight.data.fill_(0.5)
        b.norm2.bias.data.fill_(0.5)
    ENCODER_INITS.get("simmim").apply(enc)
    parts = enc.init_parts()
    assert len(parts.post_norms) == 2 * enc.num_layers
    for norm in parts.post_norms:
        assert torch.count_nonzero(norm.weight) == 0 and torch.count_nonzero(norm.bias) == 0
    assert torch.all(enc.swin.norm.weight == 1) and torch.all(enc.swin.patch_embed.norm.weight == 1)
    last = parts.residual_out[-1]  # [768 x 3072] fc2 of the last block: no rescale
    assert _close(_std(last[1].weight), 0.02) and _close(_std(last[0].weight), 0.02)
    # cosine attention's logit scale and the bias MLP keep the family's own start (log 10)
    scale = enc.swin.layers[0].blocks[0].attn.logit_scale
    assert torch.allclose(scale, torch.full_like(scale, math.log(10.0)))


def test_swinv2_does_not_decay_its_position_mlp_logit_scale_or_mask_token():
    enc = create_encoder(EncoderConfig(arch="swinv2_micro_32"))
    nd = enc.no_weight_decay()
    names = [n for n, _ in enc.named_parameters()]
    expect = {n for n in names if "cpb_mlp" in n or "logit_scale" in n} | {"mask_token"}
    assert nd == expect and any("cpb_mlp.0.weight" in n for n in nd)


def test_simmim_rule_on_swin_is_swins_own_without_rescale():
    torch.manual_seed(0)
    enc = create_encoder(EncoderConfig(arch="swin_tiny_192", img_size=96))
    default_patch = enc.init_parts().patch_embed.weight.clone()
    ENCODER_INITS.get("simmim").apply(enc)
    parts = enc.init_parts()
    last = parts.residual_out[-1]  # [768 x 3072] fc2 of the last block: no rescale
    assert _close(_std(last[1].weight), 0.02) and _close(_std(last[0].weight), 0.02)
    assert torch.equal(parts.patch_embed.weight, default_patch)  # left at PyTorch's default
    assert _close(_std(parts.mask_token), 0.02, rel=0.3)  # 96 values


def test_rules_for_vits_are_refused_on_other_families():
    with pytest.raises(ValueError, match=r"encoder_init 'mae' .* not a swin encoder: use encoder_init: timm"):
        ENCODER_INITS.get("mae").check_family("mae", "swin")
    with pytest.raises(ValueError, match="not a conv encoder"):
        ENCODER_INITS.get("simmim").check_family("simmim", "conv")
    with pytest.raises(ValueError, match="encoder_init 'beit'"):
        PretrainConfig(encoder={"arch": "swin_tiny_192"}, recipe={"name": "beit"})
    ENCODER_INITS.get("timm").check_family("timm", "conv")  # the family's own: every family


def test_mae_recipe_inits_the_encoder_and_leaves_the_decoder_to_mae():
    recipe = RecipeConfig(name="mae", head={"depth": 2, "dim": 256, "num_heads": 8})
    assert recipe.encoder_init == "mae"
    torch.manual_seed(0)
    ours = MIMModel(EncoderConfig(**MID), recipe)
    torch.manual_seed(0)
    timm_enc = MIMModel(EncoderConfig(**MID), recipe.model_copy(update={"encoder_init": "timm"}))
    qkv = ours.encoder.vit.blocks[0].attn.qkv.weight
    assert _close(_std(qkv), math.sqrt(2 / (4 * D)))
    assert not _close(_std(timm_enc.encoder.vit.blocks[0].attn.qkv.weight), math.sqrt(2 / (4 * D)))
    for model in (ours, timm_enc):  # the decoder: MAE's xavier-uniform either way
        head = model.head
        assert _close(_std(head.decoder_embed.weight), math.sqrt(2 / (D + 256)))
        assert _close(_std(head.decoder_blocks[1].mlp.fc2.weight), math.sqrt(2 / (5 * 256)))
        assert _close(_std(head.mask_token), 0.02, rel=0.2)
