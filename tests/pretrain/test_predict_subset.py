"""Predicting a random subset of the masked patches (``masking.predict_fraction``, CAPI's
``prediction_subsampling``): the subset's size and membership, the CAPI and I-JEPA losses on
it against hand computations, validation, and dumps at the default."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness.core.config import (
    ConfigError,
    EncoderConfig,
    MaskingConfig,
    PretrainConfig,
    RecipeConfig,
    dump_config,
)
from pretrain.masking import PREDICTED, UNPREDICTED, VISIBLE, SubsetMasker, create_masker
from pretrain.model import create_model

ARCH = "vit_micro_32"
MICRO_CAPI = {
    "name": "capi",
    "head": {"depth": 1, "dim": 32, "num_heads": 2},
    "target": {"clustering": {"num_clusters": 32}},
}
MICRO_IJEPA = {"name": "ijepa", "head": {"depth": 1, "dim": 32, "num_heads": 2}}


def _images(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.5


@pytest.mark.parametrize("fraction", [0.05, 0.3, 1.0])
def test_subset_is_a_random_part_of_the_masked_patches_of_the_right_size(fraction):
    cfg = MaskingConfig(strategy="capi_inverse_block", ratio=0.65, min_aspect=0.5)
    base = create_masker(cfg, (14, 14), 16)
    sub = SubsetMasker(base, fraction)
    n_masked = int(196 * 0.65)  # 127
    expect = max(1, int(n_masked * fraction))  # the reference's int(n_masked * subsampling)
    hits = torch.zeros(196)
    for seed in range(50):
        hidden = base(8, generator=torch.Generator().manual_seed(seed))
        codes = sub(8, generator=torch.Generator().manual_seed(seed))  # the same base draw first
        assert codes.dtype == torch.uint8 and set(codes.unique().tolist()) <= {0, 1, 2}
        assert torch.equal(codes != VISIBLE, hidden)  # the encoder hides the same patches
        assert ((codes == PREDICTED) <= hidden).all()  # predicted: a subset of the masked
        assert ((codes == PREDICTED).sum(1) == expect).all()
        assert ((codes == UNPREDICTED).sum(1) == n_masked - expect).all()
        hits += (codes == PREDICTED).float().sum(0)
    if fraction < 1:  # the subset is drawn anew, not one fixed pattern per mask
        assert int((hits > 0).sum()) > 4 * expect


def test_subset_keeps_codes_of_multiblock_masks():
    cfg = MaskingConfig(strategy="multiblock")
    base = create_masker(cfg, (8, 8), 4)
    g = torch.Generator().manual_seed(0)
    codes = base(16, generator=g)
    g.manual_seed(0)
    sub = SubsetMasker(base, 0.5)(16, generator=g)
    assert torch.equal(sub == VISIBLE, codes == VISIBLE)
    assert ((sub == UNPREDICTED) >= (codes == UNPREDICTED)).all()  # outside stays outside
    n = (codes == PREDICTED).sum(1)
    assert torch.equal((sub == PREDICTED).sum(1), torch.clamp((n * 0.5).long(), min=1))


def test_subset_draws_uniformly_over_the_masked_patches():
    base = create_masker(MaskingConfig(strategy="central", ratio=0.25), (8, 8), 4)
    masked = base(1)[0]  # the same centre square in every image: 16 patches
    codes = SubsetMasker(base, 0.25)(4000, generator=torch.Generator().manual_seed(0))
    freq = (codes == PREDICTED).float().mean(0)  # each masked patch: 4 of 16, p = 0.25
    assert float(freq[~masked].max()) == 0.0
    assert (freq[masked] - 0.25).abs().max() < 0.03


def test_capi_predicts_only_the_subset_and_its_loss_is_the_hand_computed_one():
    torch.manual_seed(0)
    rec = {**MICRO_CAPI, "masking": {"predict_fraction": 0.25}}
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**rec))
    imgs = _images()
    mask = model.masker(4, generator=torch.Generator().manual_seed(0))  # [B, L] codes
    n_masked = model.masker.num_masked
    sel = mask == PREDICTED
    assert (sel.sum(1) == int(n_masked * 0.25)).all()
    out = model(imgs, mask)
    # one query per predicted patch: nothing is predicted at the other positions
    assert (out.pred[~sel] == 0).all() and (out.pred[sel] != 0).any(-1).all()
    tgt = model.target(imgs)  # deterministic: the teacher in eval mode, Sinkhorn-Knopp
    temp = model.recipe.target.clustering.student_temp
    logp = F.log_softmax(out.pred[sel].double() / temp, dim=-1)  # [N, K]
    ce = -(tgt.value[sel].double() * logp).sum(-1).mean()
    torch.testing.assert_close(out.loss.double(), ce + tgt.clustering_loss.double(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.head.mask_token.grad is not None


def test_ijepa_loss_is_smooth_l1_on_the_subset():
    torch.manual_seed(0)
    rec = {**MICRO_IJEPA, "masking": {"predict_fraction": 0.5}}
    model = create_model(EncoderConfig(arch=ARCH), RecipeConfig(**rec))
    imgs = _images()
    mask = model.masker(4, generator=torch.Generator().manual_seed(1))
    sel = mask == PREDICTED
    assert sel.any() and (mask == UNPREDICTED).any()
    out = model(imgs, mask)
    beta = model.recipe.loss.beta
    per_patch = F.smooth_l1_loss(out.pred[sel].float(), out.target[sel].float(), beta=beta,
                                 reduction="none").mean(-1)  # fmt: skip
    torch.testing.assert_close(out.loss, per_patch.mean())


@pytest.mark.parametrize(
    "rec,match",
    [
        ({"name": "data2vec2", "masking": {"predict_fraction": 0.5}}, r"predict_fraction 0.5.*head 'conv_decoder'.*cross_attention"),
        ({"name": "mae", "masking": {"predict_fraction": 0.5}}, r"head 'mae_decoder'"),
        ({**MICRO_CAPI, "masking": {"predict_fraction": 0.5}, "loss": {"on": "all"}}, r"loss.on 'all'"),
        ({**MICRO_CAPI, "masking": {"predict_fraction": 0.0}}, r"predict_fraction"),
        ({**MICRO_CAPI, "masking": {"predict_fraction": 1.5}}, r"predict_fraction"),
        # late checks of the same class, now at validation: the predictor batches equal counts
        ({**MICRO_CAPI, "masking": {"strategy": "multiblock"}},
         r"head 'cross_attention' predicts the same number.*strategy 'multiblock'.*capi_inverse_block"),
        ({**MICRO_CAPI, "encoder_mode": "mask_token", "masking": {"strategy": "ibot_block"}},
         r"strategy 'ibot_block' predicts a different number"),
        # and its attention heads
        ({**MICRO_CAPI, "head": {"depth": 1, "dim": 30, "num_heads": 4}},
         r"recipe: head.dim 30 is not divisible by head.num_heads 4.*\(encoder 'vit_micro_32'\)"),
    ],
)
def test_heads_that_cannot_use_a_subset_are_refused(rec, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        PretrainConfig(encoder={"arch": ARCH}, recipe=rec)


def test_key_stays_out_of_dumps_at_its_default():
    base = PretrainConfig(encoder={"arch": ARCH}, recipe={**MICRO_IJEPA})
    assert "predict_fraction" not in dump_config(base)
    sub = PretrainConfig(encoder={"arch": ARCH}, recipe={**MICRO_IJEPA, "masking": {"predict_fraction": 0.5}})
    assert "predict_fraction: 0.5" in dump_config(sub)
