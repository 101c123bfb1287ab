"""SimMIM's and MAE's losses against hand computations on small tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.core.config import EncoderConfig, LossConfig, RecipeConfig, TargetConfig
from pretrain.model import MIMModel
from pretrain.targets import make_target, reconstruction_loss


def _patchify_loop(img: torch.Tensor, p: int) -> torch.Tensor:
    """Reference patchify with explicit loops: [C, H, W] -> [L, p*p*C] (row, col, channel)."""
    c, h, w = img.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            patch = img[:, i * p : (i + 1) * p, j * p : (j + 1) * p]  # [C, p, p]
            rows.append(patch.permute(1, 2, 0).reshape(-1))
    return torch.stack(rows)


def test_simmim_l1_equals_the_paper_formula_in_pixel_space():
    torch.manual_seed(0)
    b, p, size = 2, 4, 16
    x = torch.randn(b, 3, size, size)
    x_rec = torch.randn(b, 3, size, size)
    mask = torch.rand(b, (size // p) ** 2) < 0.5
    # SimMIM: mask upsampled to pixels; loss = sum(|x_rec - x| * mask) / (sum(mask) + eps) / C
    pix_mask = mask.view(b, 1, size // p, size // p).float()
    pix_mask = pix_mask.repeat_interleave(p, 2).repeat_interleave(p, 3)
    expected = (F.l1_loss(x, x_rec, reduction="none") * pix_mask).sum() / (pix_mask.sum() + 1e-5) / 3
    pred = torch.stack([_patchify_loop(x_rec[i], p) for i in range(b)])
    target = torch.stack([_patchify_loop(x[i], p) for i in range(b)])
    got = reconstruction_loss(pred, target, mask, LossConfig(type="l1", on="masked"))
    assert torch.allclose(got, expected, rtol=1e-5)


def test_mae_norm_pix_mse_by_hand():
    torch.manual_seed(1)
    b, L, P = 2, 5, 6
    patches = torch.randn(b, L, P)
    pred = torch.randn(b, L, P)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    target, mean, std = make_target(patches, TargetConfig(type="norm_pixels"))
    total, count = 0.0, 0
    for i in range(b):
        for j in range(L):
            v = patches[i, j].double()
            mu = v.sum() / P
            var = ((v - mu) ** 2).sum() / (P - 1)  # unbiased, as torch.var in MAE's code
            t = (v - mu) / (var + 1e-6).sqrt()
            assert torch.allclose(target[i, j].double(), t, atol=1e-5)
            if mask[i, j]:
                total += float(((pred[i, j].double() - t) ** 2).mean())
                count += 1
    got = reconstruction_loss(pred, target, mask, LossConfig(type="l2", on="masked"))
    assert abs(got.item() - total / count) < 1e-5
    assert torch.allclose(target * std + mean, patches, atol=1e-5)


def test_loss_on_all_patches_and_smooth_l1():
    pred = torch.tensor([[[0.0, 3.0]], [[1.0, 1.0]]])  # [2, 1, 2]
    target = torch.zeros(2, 1, 2)
    mask = torch.tensor([[True], [False]])
    # smooth-l1 (beta 1): 0 -> 0, 3 -> 2.5, 1 -> 0.5
    got_all = reconstruction_loss(pred, target, mask, LossConfig(type="smooth_l1", on="all"))
    assert abs(got_all.item() - (1.25 + 0.5) / 2) < 1e-6
    got_masked = reconstruction_loss(pred, target, mask, LossConfig(type="smooth_l1", on="masked"))
    assert abs(got_masked.item() - 1.25) < 1e-6


def test_model_loss_matches_independent_patchify():
    torch.manual_seed(2)
    model = MIMModel(EncoderConfig(arch="vit_micro_32"), RecipeConfig(name="mae", head={"depth": 1, "dim": 32, "num_heads": 2}))
    x = torch.randn(2, 3, 32, 32)
    mask = model.masker(2, generator=torch.Generator().manual_seed(0))
    out = model(x, mask)
    ref = torch.stack([_patchify_loop(x[i], 8) for i in range(2)])
    assert torch.allclose(model.encoder.patchify(x), ref)
    assert torch.allclose(model.encoder.unpatchify(ref), x)
    t, _, _ = make_target(ref, TargetConfig(type="norm_pixels"))
    per = ((out.pred - t) ** 2).mean(-1)
    assert torch.allclose(out.loss, per[mask].mean(), rtol=1e-5)
