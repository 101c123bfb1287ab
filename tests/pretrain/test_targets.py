"""Targets with known answers: HOG against scikit-image, colors, tokenizers, DALL-E's loader."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.core.config import HOGConfig, LossConfig, TargetConfig, TokenizerConfig
from pretrain.dall_e import DallEEncoder, DallETokenizer, load_dall_e_encoder, map_pixels
from pretrain.maskfeat import HOGTarget, hog_histograms, hog_to_patches, patches_to_hog
from pretrain.targets import (
    ColorBinsTarget,
    classification_loss,
    from_unit,
    patchify,
)
from pretrain.tokenizers import DVAETokenizer, KMeansTokenizer, VQVAETokenizer, kmeans
from pretrain.vit_mpp import MeanColorTarget

skimage_feature = pytest.importorskip("skimage.feature")


def _skimage_cells(gray: np.ndarray, nb: int = 9, cell: int = 8) -> np.ndarray:
    """scikit-image's per-cell histograms, each L2-normalized: ``[Hc, Wc, nb]``."""
    out = skimage_feature.hog(
        gray,
        orientations=nb,
        pixels_per_cell=(cell, cell),
        cells_per_block=(1, 1),
        block_norm="L2",
        feature_vector=False,
    )
    return out[:, :, 0, 0, :]


@pytest.mark.parametrize("shape,nb,cell", [((16, 16), 9, 8), ((32, 48), 9, 8), ((24, 24), 6, 4)])
def test_hog_matches_scikit_image_on_the_same_patch(shape, nb, cell):
    rng = np.random.default_rng(0)
    gray = rng.random(shape)
    cfg = HOGConfig(orientations=nb, cell_size=cell, gradient="central", gaussian_window=0)
    ours = hog_histograms(torch.from_numpy(gray)[None, None], cfg)[0, 0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, _skimage_cells(gray, nb, cell), atol=1e-6)


def test_hog_per_channel_and_patch_layout_match_scikit_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 16, 16)).astype(np.float64)  # one 16 px patch, three channels
    cfg = TargetConfig(type="hog", hog={"gradient": "central", "gaussian_window": 0})
    target = HOGTarget(cfg, patch_size=16, grid=(1, 1))
    assert target.out_dim == 108  # MaskFeat: 2x2 cells x 3 channels x 9 bins
    vec = hog_to_patches(hog_histograms(torch.from_numpy(img)[None], cfg.hog), 2)[0, 0]  # [108]
    expected = np.stack([_skimage_cells(img[c]) for c in range(3)])  # [3, 2, 2, 9]
    np.testing.assert_allclose(
        vec.view(3, 9, 2, 2).numpy(), expected.transpose(0, 3, 1, 2), atol=1e-6
    )
    hist = hog_histograms(torch.from_numpy(img)[None], cfg.hog)  # [1, 3, 9, 2, 2]
    assert torch.equal(patches_to_hog(hog_to_patches(hist, 2), (1, 1), 3, 9, 2), hist)


def test_sobel_hog_of_a_vertical_edge_votes_for_horizontal_gradients():
    img = torch.zeros(1, 1, 16, 16)
    img[..., 8:] = 1.0  # a vertical edge: the gradient points along +columns (0 degrees)
    h = hog_histograms(img, HOGConfig(gaussian_window=16))  # MaskFeat's Sobel + Gaussian
    assert h.shape == (1, 1, 9, 2, 2)
    assert torch.allclose(h[0, 0, 0], torch.ones(2, 2), atol=1e-4)  # all energy in bin 0
    assert torch.allclose(h[0, 0, 1:].sum(0), torch.zeros(2, 2))
    flat = hog_histograms(torch.full((1, 3, 16, 16), 0.3), HOGConfig())
    assert torch.equal(flat, torch.zeros_like(flat))  # no gradient, no vote


def test_color_bins_known_answer():
    unit = torch.zeros(1, 3, 4, 4)
    unit[:, 0] = 0.0
    unit[:, 1] = 0.5
    unit[:, 2] = 0.99
    t = ColorBinsTarget(TargetConfig(type="color_bins", bins=4), patch_size=2, grid=(2, 2))
    out = t(from_unit(unit))
    assert out.value.shape == (1, 4, 12) and t.out_dim == 2 * 2 * 3 * 4
    assert out.value[0, 0].tolist() == [0, 2, 3] * 4  # (R, G, B) bins of each pixel
    pred = F.one_hot(out.value, 4).float().flatten(2) * 10  # confident and right
    img = t.pred_image(pred, out)
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([0.125, 0.625, 0.875]))


def test_mean_color_is_vits_3bit_512_way_class():
    t = MeanColorTarget(TargetConfig(type="mean_color", bins=8), patch_size=2, grid=(1, 2))
    assert t.num_classes == t.out_dim == 512
    unit = torch.zeros(1, 3, 2, 4)
    unit[0, :, :, :2] = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1)  # patch 0: (7, 0, 4)
    unit[0, 0, :, 2:] = torch.tensor([[0.0, 0.25], [0.25, 0.5]])  # patch 1: R mean 0.25 -> 2
    out = t(from_unit(unit))
    assert out.value[0, :, 0].tolist() == [(7 * 8 + 0) * 8 + 4, (2 * 8 + 0) * 8 + 0]
    img = t.target_image(out)
    assert torch.allclose(img[0, :, 0, 0], torch.tensor([7.5, 0.5, 4.5]) / 8)


def test_cross_entropy_loss_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]])  # [B=2, L=1, G=2 x K=2]
    labels = torch.tensor([[[0, 1]], [[1, 0]]])
    mask = torch.tensor([[True], [False]])
    ce = lambda z, y: -(z[y] - torch.logsumexp(z, 0))  # noqa: E731
    first = (ce(torch.tensor([2.0, 0.0]), 0) + ce(torch.tensor([0.0, 1.0]), 1)) / 2
    got = classification_loss(logits, labels, mask, LossConfig(type="cross_entropy"), 2)
    assert torch.allclose(got, first)
    got_all = classification_loss(
        logits, labels, mask, LossConfig(type="cross_entropy", on="all"), 2
    )
    assert torch.allclose(got_all, (first + torch.log(torch.tensor(2.0))) / 2)


def _color_patch_images(colors: torch.Tensor, n: int, grid: int, p: int, seed: int) -> torch.Tensor:
    """Images whose patches are each one of ``colors`` (normalized space) chosen at random."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(colors), (n, grid, grid), generator=g)
    img = colors[idx].permute(0, 3, 1, 2)  # [n, 3, grid, grid]
    return img.repeat_interleave(p, 2).repeat_interleave(p, 3), idx


def test_kmeans_tokenizer_recovers_known_clusters():
    colors = from_unit(
        torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.2, 0.2, 0.2]]).view(
            5, 3, 1, 1
        )
    ).view(5, 3)
    imgs, idx = _color_patch_images(colors, 12, 4, 8, seed=0)
    tok = KMeansTokenizer(TokenizerConfig(type="kmeans", vocab_size=5, kmeans_iters=5), 32, (4, 4))
    tok.fit(imgs, log=lambda m: None, seed=0)
    tokens = tok.encode(imgs)  # [12, 16]
    # a bijection between the true colors and the tokens
    pairs = {(int(a), int(b)) for a, b in zip(idx.flatten(), tokens.flatten(), strict=True)}
    assert len(pairs) == 5 and len({a for a, _ in pairs}) == 5 and len({b for _, b in pairs}) == 5
    rec = tok.decode(tokens)
    assert torch.allclose(from_unit(rec), imgs, atol=1e-4)


def test_kmeans_function_on_separated_points_and_too_few_points():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = centers.repeat(50, 1) + 0.1 * torch.randn(150, 2, generator=g)
    cent = kmeans(pts, 3, 10, torch.Generator().manual_seed(1))
    d = torch.cdist(cent, centers).min(1).values
    assert (d < 0.1).all()
    with pytest.raises(ValueError, match="at least 8 points"):
        kmeans(pts[:5], 8, 1, g)


@pytest.mark.parametrize("cls", [VQVAETokenizer, DVAETokenizer])
def test_trained_tokenizers_learn_and_emit_tokens_on_the_patch_grid(cls):
    torch.manual_seed(0)
    colors = from_unit(torch.rand(4, 3).view(4, 3, 1, 1)).view(4, 3)
    imgs, _ = _color_patch_images(colors, 16, 4, 4, seed=1)  # 16 px images of 4 px color patches
    cfg = TokenizerConfig(
        type=cls.__name__[:-9].lower(),
        vocab_size=8,
        hidden=16,
        code_dim=8,
        train_steps=300,
        lr=3e-3,
        batch_size=8,
    )
    tok = cls(cfg, 16, (4, 4))
    before = F.mse_loss(from_unit(tok.decode(tok.encode(imgs))), imgs).item()
    rng_before = torch.get_rng_state()
    tok.fit(imgs, log=lambda m: None, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # fitting leaves the global RNG alone
    tokens = tok.encode(imgs)
    assert tokens.shape == (16, 16) and tokens.min() >= 0 and tokens.max() < 8
    after = F.mse_loss(from_unit(tok.decode(tokens)), imgs).item()
    assert after < 0.6 * before


def _write_fake_dall_e_package(root):
    """A stand-in for OpenAI's ``dall_e`` package: same class paths, module attributes and
    parameter names as the release, so ``torch.save(encoder)`` pickles like ``encoder.pkl``."""
    pkg = root / "dall_e"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "utils.py").write_text(
        textwrap.dedent("""
        import torch, torch.nn as nn, torch.nn.functional as F
        class Conv2d(nn.Module):
            def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device('cpu'), requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
                self.device, self.requires_grad = device, requires_grad
                self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw ** 2) ** 0.5, requires_grad=False)
                self.b = nn.Parameter(torch.randn(n_out) * 0.1, requires_grad=False)
            def forward(self, x):
                return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)
    """)
    )
    (pkg / "encoder.py").write_text(
        textwrap.dedent("""
        import torch, torch.nn as nn
        from collections import OrderedDict
        from dall_e.utils import Conv2d
        class EncoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers, self.device = n_in, n_out, n_layers, device
                self.n_hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
                self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                h = self.n_hid
                self.res_path = nn.Sequential(OrderedDict([
                    ('relu_1', nn.ReLU()), ('conv_1', Conv2d(n_in, h, 3)), ('relu_2', nn.ReLU()),
                    ('conv_2', Conv2d(h, h, 3)), ('relu_3', nn.ReLU()), ('conv_3', Conv2d(h, h, 3)),
                    ('relu_4', nn.ReLU()), ('conv_4', Conv2d(h, n_out, 1))]))
            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)
        class Encoder(nn.Module):
            def __init__(self, n_hid=256, n_blk_per_group=2, vocab_size=8192):
                super().__init__()
                self.group_count, self.n_hid, self.n_blk_per_group = 4, n_hid, n_blk_per_group
                self.input_channels, self.vocab_size = 3, vocab_size
                self.device, self.requires_grad, self.use_mixed_precision = torch.device('cpu'), False, True
                n, w = 4 * n_blk_per_group, [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
                def group(g, pool):
                    items = [(f'block_{i + 1}', EncoderBlock(w[g - 1] if i == 0 else w[g], w[g], n))
                             for i in range(n_blk_per_group)]
                    return nn.Sequential(OrderedDict(items + ([('pool', nn.MaxPool2d(kernel_size=2))] if pool else [])))
                self.blocks = nn.Sequential(OrderedDict([
                    ('input', Conv2d(3, n_hid, 7)),
                    ('group_1', group(1, True)), ('group_2', group(2, True)),
                    ('group_3', group(3, True)), ('group_4', group(4, False)),
                    ('output', nn.Sequential(OrderedDict([('relu', nn.ReLU()),
                                                          ('conv', Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))])))]))
            def forward(self, x):
                return self.blocks(x)
    """)
    )


def test_dall_e_encoder_pkl_loads_without_the_dall_e_package(tmp_path, monkeypatch):
    _write_fake_dall_e_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dall_e.encoder import Encoder  # the stand-in package

    torch.manual_seed(0)
    official = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = official(map_pixels(x))
    torch.save(official, tmp_path / "encoder.pkl")  # pickled like OpenAI's encoder.pkl
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])

    ours = load_dall_e_encoder(tmp_path / "encoder.pkl")
    assert set(ours.state_dict()) == set(official.state_dict())
    with torch.no_grad():
        assert torch.allclose(ours(map_pixels(x)), expected, atol=1e-5)
    # the same weights as a plain state dict, and through the tokenizer (8x down, argmax)
    torch.save(official.state_dict(), tmp_path / "state.pth")
    cfg = TokenizerConfig(
        type="dall_e", path=str(tmp_path / "state.pth"), vocab_size=512, input_size=32
    )
    tok = DallETokenizer(cfg, 64, (4, 4))
    tokens = tok.encode(from_unit(F.interpolate(x, size=64, mode="bilinear", antialias=True)))
    assert tokens.shape == (2, 16) and tokens.max() < 512
    assert not any(k.startswith("encoder") for k in tok.state_dict())  # kept out of checkpoints
    assert tok.double().encoder.blocks.input.w.dtype == torch.float64  # but moved with the module


def test_dall_e_key_layout_is_the_official_one():
    keys = set(DallEEncoder(n_hid=64, n_blk_per_group=2, vocab_size=512).state_dict())
    for k in [
        "blocks.input.w",
        "blocks.group_1.block_1.res_path.conv_1.w",
        "blocks.group_2.block_1.id_path.w",
        "blocks.group_4.block_2.res_path.conv_4.b",
        "blocks.output.conv.w",
    ]:
        assert k in keys
    assert "blocks.group_1.block_1.id_path.w" not in keys  # same widths: identity path


def test_dall_e_tokenizer_needs_a_path_and_the_right_size(tmp_path):
    with pytest.raises(ValueError, match="needs the weights"):
        DallETokenizer(TokenizerConfig(type="dall_e", input_size=112), 224, (14, 14))
    with pytest.raises(ValueError, match="downsamples by 8"):
        DallETokenizer(TokenizerConfig(type="dall_e", input_size=224, path="x"), 224, (14, 14))


def test_patchify_round_trip_in_targets():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    from pretrain.targets import unpatchify

    assert torch.equal(unpatchify(p, 4, (2, 3)), x)
