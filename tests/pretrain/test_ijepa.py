"""I-JEPA (:mod:`pretrain.ijepa`): multi-block masks meet their statistics over many draws, the
predictor's attention leaves out patches outside context and targets, its width is validated,
and the latent recipes' losses go down on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch

from harness.core.config import EncoderConfig, MaskingConfig, PretrainConfig, RecipeConfig
from pretrain.ijepa import CONTEXT, OUTSIDE, TARGET, MultiBlockMasker
from pretrain.model import MIMModel

ENC = EncoderConfig(arch="vit_micro_32")  # 4x4 patches, width 32
IJEPA = {"name": "ijepa", "head": {"depth": 1, "dim": 16, "num_heads": 2}}


def _masker(grid=(14, 14)) -> MultiBlockMasker:
    return MultiBlockMasker(MaskingConfig(strategy="multiblock"), grid, 16)


def test_multiblock_masks_meet_their_statistics_over_many_draws():
    masker = _masker()
    n = 14 * 14
    gen = torch.Generator().manual_seed(0)
    scales, aspects, ctx_scales = [], [], []
    for _ in range(100):
        codes = masker(8, gen)  # [8, 196]
        (th, tw), (ch, cw) = masker.last_sizes
        scales.append(th * tw / n)
        aspects.append(th / tw)
        ctx_scales.append(ch * cw / n)
        assert ch == cw  # the context block is square
        assert len(masker.last_targets) == 8
        assert all(len(boxes) == 4 for boxes in masker.last_targets)  # four target blocks each
        for i, boxes in enumerate(masker.last_targets):
            union = torch.zeros(14, 14, dtype=torch.bool)
            for top, left, h, w in boxes:
                assert (h, w) == (th, tw) and top + h <= 14 and left + w <= 14
                union[top : top + h, left : left + w] = True
            grid = codes[i].view(14, 14)
            assert torch.equal(grid == TARGET, union)  # targets are exactly the four blocks
            assert not ((grid == CONTEXT) & union).any()  # no overlap of context and targets
        ctx = (codes == CONTEXT).sum(dim=1)
        assert bool((ctx == ctx[0]).all()) and int(ctx[0]) >= 10  # cut to the batch minimum
    # rounding to whole patches moves a block's scale and aspect a little off the drawn values
    assert min(scales) >= 0.13 and max(scales) <= 0.22
    assert min(aspects) >= 0.6 and max(aspects) <= 1.8
    assert min(ctx_scales) >= 0.7 and max(ctx_scales) <= 0.93  # the side stays below the grid
    assert max(aspects) - min(aspects) > 0.4  # the aspect range is used


def test_block_size_follows_the_reference_rounding():
    from pretrain.ijepa import block_size

    # int(196 * 0.2) = 39 patches at aspect 1.5: h = round(sqrt(58.5)) = 8, w = round(sqrt(26)) = 5
    assert block_size(196, 0.2, 1.5, (14, 14)) == (8, 5)
    assert block_size(196, 1.0, 1.0, (14, 14)) == (13, 13)  # below the grid's side


def test_the_predictor_ignores_patches_outside_context_and_targets():
    torch.manual_seed(0)
    model = MIMModel(ENC, RecipeConfig(**IJEPA, masking={"multiblock": {"min_context": 1}}))
    model.eval()
    mask = torch.tensor([[CONTEXT] * 6 + [TARGET] * 4 + [OUTSIDE] * 6])  # [1, 16]
    imgs = torch.randn(1, 3, 32, 32)
    hidden = mask != 0
    tokens, ids_restore = model.encode(imgs, hidden)
    assert tokens.shape[1] == 1 + 6  # the class token and the six context patches
    pred = model.head(tokens, mask, ids_restore)  # [1, 16, 32]
    # a different value at an outside position changes no target's prediction
    other = model.head.embed_grid(tokens, ids_restore)
    assert other.shape == (1, 17, 16)
    # the mask token sits at target and outside positions (a random change: a constant one is
    # removed by the LayerNorms, which subtract each token's mean)
    delta = torch.randn_like(model.head.mask_token)
    model.head.mask_token.data += delta
    moved = model.head(tokens, mask, ids_restore)
    assert not torch.allclose(pred[0, 6:10], moved[0, 6:10], atol=1e-4)
    model.head.mask_token.data -= delta
    mask2 = mask.clone()
    mask2[0, 10:] = TARGET  # the outside positions now take part
    pred2 = model.head(tokens, mask2, ids_restore)
    assert not torch.allclose(pred[0, 6:10], pred2[0, 6:10])
    torch.testing.assert_close(model.head(tokens, mask, ids_restore), pred)


def test_the_predictor_starts_as_the_reference_leaves_it():
    """``src/helper.py`` ``init_model``: every linear layer of the predictor trunc-normal(0.02)
    with zero bias, after its own ``fix_init_weight`` (so no block is rescaled); not MAE's
    xavier-uniform, whose std for the 256 -> 1024 fc1 would be sqrt(2 / 1280) ~ 0.040."""
    torch.manual_seed(0)
    recipe = RecipeConfig(name="ijepa", head={"depth": 2, "dim": 256, "num_heads": 4})
    enc = EncoderConfig(arch="vit_small_16", img_size=64, depth=1)
    head = MIMModel(enc, recipe).head
    for blk in head.decoder_blocks:
        for lin in (blk.attn.qkv, blk.mlp.fc1, blk.mlp.fc2, blk.attn.proj):
            assert abs(float(lin.weight.std()) - 0.02) < 0.0015, lin
            assert float(lin.bias.abs().max()) == 0.0
    assert abs(float(head.decoder_embed.weight.std()) - 0.02) < 0.0015
    assert abs(float(head.decoder_pred.weight.std()) - 0.02) < 0.0015


def test_a_predictor_wider_than_the_encoder_is_refused():
    with pytest.raises(ValueError, match="recipe.head.dim 64 is wider than the encoder"):
        PretrainConfig(encoder=ENC, recipe={**IJEPA, "head": {"dim": 64, "num_heads": 2}})


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        {"name": "data2vec", "masking": {"min_block_patches": 2, "ratio": 0.5},
         "target": {"latent": {"top_k": 2}}},
        {**IJEPA, "masking": {"multiblock": {"min_context": 2}}},
    ],
    ids=["data2vec", "ijepa"],
)
def test_latent_recipe_loss_goes_down_on_a_fixed_batch(recipe):
    torch.manual_seed(0)
    model = MIMModel(ENC, RecipeConfig(**recipe))
    imgs = torch.randn(8, 3, 32, 32)
    mask = model.masker(8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(1, 31):  # I-JEPA's trunc-normal(0.02) predictor: ~0.58 of the start by 30
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_step(step)
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
