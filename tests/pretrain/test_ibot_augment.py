"""iBOT's (DINO's) photometric augmentation, ``recipe.augment: dino``: each kind of crop gets the
reference's ops and probabilities (bytedance/ibot main_ibot.py ``DataAugmentationiBOT``,
utils.py ``GaussianBlur`` / ``Solarization``), checked on the built transforms and by their
statistics over many draws; the engine builds them from the recipe; the draws stay seeded per
sample; bad values are refused."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import TWO_STEP_TRAIN
from PIL import Image, ImageFilter
from torchvision import transforms

from harness.core.config import ConfigError, PretrainConfig, RecipeConfig
from harness.core.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Crops,
    MultiView,
    RandomGaussianBlur,
    RandomSolarize,
    SeededDataset,
    photometric_ops,
    pretrain_transform,
)

ARCH = "vit_micro_32"
MICRO_IBOT_LOCAL = {
    "name": "ibot",
    "local_crops": 2,
    "local_crop_size": 16,
    "target": {"ibot": {"out_dim": 64, "patch_out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}},
}
# the reference's blur / solarization probabilities per kind of crop (DataAugmentationiBOT)
BLUR_P = {"first": 1.0, "other": 0.1, "local": 0.5}
SOLARIZE_P = {"first": 0.0, "other": 0.2, "local": 0.0}


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """A normalised crop ``[3, H, W]`` back to 0..255 values."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def _pipeline(view: str, size: int = 8) -> transforms.Compose:
    return pretrain_transform(size, (0.25, 1.0), True, photometric_ops("dino", view))


def _check_dino_ops(ops: list, view: str) -> None:
    jitter, gray, blur = ops[:3]
    assert isinstance(jitter, transforms.RandomApply) and jitter.p == 0.8
    (cj,) = jitter.transforms
    assert isinstance(cj, transforms.ColorJitter)
    # ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) as its factor ranges
    assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
    assert cj.saturation == pytest.approx((0.8, 1.2)) and cj.hue == pytest.approx((-0.1, 0.1))
    assert isinstance(gray, transforms.RandomGrayscale) and gray.p == 0.2
    assert isinstance(blur, RandomGaussianBlur)
    assert blur.p == BLUR_P[view] and blur.radius == (0.1, 2.0)
    if SOLARIZE_P[view]:
        (sol,) = ops[3:]
        assert isinstance(sol, RandomSolarize) and (sol.p, sol.threshold) == (0.2, 128)
    else:
        assert len(ops) == 3


@pytest.mark.parametrize("view", ["first", "other", "local"])
def test_each_view_has_the_references_ops_and_probabilities(view):
    _check_dino_ops(photometric_ops("dino", view), view)
    # in the pipeline: after the crop and the flip, before ToTensor / Normalize
    t = _pipeline(view).transforms
    assert isinstance(t[0], transforms.RandomResizedCrop)
    assert isinstance(t[1], transforms.RandomHorizontalFlip)
    _check_dino_ops(t[2:-2], view)
    assert isinstance(t[-2], transforms.ToTensor) and isinstance(t[-1], transforms.Normalize)
    assert photometric_ops("none", view) == []


@pytest.mark.slow
def test_colour_and_grayscale_draws_meet_their_probabilities():
    # a constant colour stays constant through crop, flip and blur: the output colour shows
    # whether the jitter (p 0.8) and the grayscale (p 0.2) ran
    src = (60, 30, 15)  # dark: no channel reaches the solarization threshold of 128
    img = Image.new("RGB", (16, 16), src)
    torch.manual_seed(0)
    n = 4000
    for view in ("first", "other", "local"):
        tf = _pipeline(view)
        outs = torch.stack([_pixels(tf(img)).flatten(1).mean(1) for _ in range(n)])  # [n, 3]
        gray = (outs.max(1).values - outs.min(1).values) < 0.5
        same = (outs - torch.tensor(src, dtype=torch.float)).abs().max(1).values < 0.5
        # 4 sigma, sigma = sqrt(p (1 - p) / n): 0.0063 for 0.2, 0.0058 for 0.16
        assert abs(float(gray.float().mean()) - 0.2) < 0.025, view
        # untouched: neither jittered (0.2) nor grayed (0.8)
        assert abs(float(same.float().mean()) - 0.2 * 0.8) < 0.023, view
        assert not bool((same & gray).any())


@pytest.mark.slow
def test_solarization_only_on_the_second_global_crops():
    # a light grey: brightness 0.6..1.4 keeps it at 144 or above (contrast, saturation, hue and
    # grayscale leave a grey alone), so a value under 128 is a solarized crop
    img = Image.new("RGB", (16, 16), (240, 240, 240))
    torch.manual_seed(1)
    n = 4000
    for view in ("first", "other", "local"):
        tf = _pipeline(view)
        vals = torch.stack([_pixels(tf(img)).mean() for _ in range(n)])
        frac = float((vals < 128).float().mean())
        if SOLARIZE_P[view]:
            assert abs(frac - 0.2) < 0.025  # 4 sigma of 4000 draws
            low = vals[vals < 128]  # 255 - v for v in [144, 255]
            assert float(low.max()) <= 255 - 144 + 0.5
        else:
            assert frac == 0.0, view


@pytest.mark.slow
def test_blur_draws_meet_their_probabilities_and_radius(monkeypatch):
    radii: list[float] = []
    filt = Image.Image.filter

    def spy(self, f):
        if isinstance(f, ImageFilter.GaussianBlur):
            radii.append(float(f.radius))
        return filt(self, f)

    monkeypatch.setattr(Image.Image, "filter", spy)
    img = Image.new("RGB", (16, 16), (120, 80, 40))
    torch.manual_seed(2)
    n = 4000
    for view in ("first", "other", "local"):
        radii.clear()
        tf = _pipeline(view)
        for _ in range(n):
            tf(img)
        frac = len(radii) / n
        if BLUR_P[view] == 1.0:
            assert len(radii) == n  # the first global crop: always blurred
        else:
            p = BLUR_P[view]
            assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n), view
        # the radius uniform in [0.1, 2]: mean 1.05, sd 0.548
        assert min(radii) >= 0.1 and max(radii) <= 2.0
        assert abs(sum(radii) / len(radii) - 1.05) < 4 * 0.548 / math.sqrt(len(radii))


def test_blur_is_pils_gaussian_and_solarize_inverts_from_128():
    g = Image.effect_noise((24, 24), 60).convert("RGB")
    torch.manual_seed(3)
    out = RandomGaussianBlur(1.0)(g)
    torch.manual_seed(3)
    torch.rand(())  # the apply draw
    r = float(torch.empty(()).uniform_(0.1, 2.0))
    assert list(out.getdata()) == list(g.filter(ImageFilter.GaussianBlur(r)).getdata())
    assert list(out.getdata()) != list(g.getdata())
    ramp = Image.frombytes("L", (256, 1), bytes(range(256))).convert("RGB")
    sol = list(RandomSolarize(1.0)(ramp).getdata())
    assert [px[0] for px in sol] == [v if v < 128 else 255 - v for v in range(256)]
    assert RandomSolarize(0.0)(ramp) is ramp and RandomGaussianBlur(0.0)(ramp) is ramp


def test_multiview_draws_the_first_view_from_its_own_transform():
    calls: list[str] = []

    def first(img):
        calls.append("first")
        return torch.zeros(3, 4, 4)

    def rest(img):
        calls.append("rest")
        return torch.ones(3, 4, 4)

    mv = MultiView(first, 3, rest=rest)
    out = mv(None)
    assert calls == ["first", "rest", "rest"] and out.shape == (3, 3, 4, 4)
    assert float(out[0].sum()) == 0 and float(out[1:].min()) == 1
    assert MultiView(first, 1, rest=rest)(None).shape == (3, 4, 4)  # one view: the first's


class _One(torch.utils.data.Dataset):
    def __init__(self, tf):
        self.tf = tf
        self.img = Image.effect_noise((40, 40), 50).convert("RGB")

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.tf(self.img)


def test_augmented_crops_are_seeded_per_sample():
    # every draw (jitter, grayscale, blur, its radius, solarization) comes from torch's
    # generator, which SeededDataset seeds per (seed, epoch, index): Python's random is not used
    mv = MultiView(_pipeline("first", 32), 2, _pipeline("local", 16), 3, _pipeline("other", 32))
    ds = SeededDataset(_One(mv), seed=5)
    a = ds[1]
    random.seed(123)
    torch.manual_seed(99)
    b = ds[1]
    assert isinstance(a, Crops) and isinstance(b, Crops)
    assert torch.equal(a.views, b.views) and torch.equal(a.local, b.local)
    c = ds[2]
    assert not torch.equal(a.views, c.views)
    ds.set_epoch(1)
    assert not torch.equal(ds[1].views, a.views)


def test_recipe_files_and_dumps():
    ibot = RecipeConfig(name="ibot")
    assert ibot.augment == "dino" and ibot.model_dump()["augment"] == "dino"
    mae = RecipeConfig(name="mae")
    assert mae.augment == "none" and "augment" not in mae.model_dump()  # hashes unchanged


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"recipe.augment 'simclr' is not an augmentation set: "
                       r"use none or dino"):
        RecipeConfig(name="ibot", augment="simclr")
    with pytest.raises((ConfigError, ValueError), match=r"fast_decode .*recipe.augment 'dino'.*"
                       r"set data.fast_decode: false or recipe.augment: none"):
        PretrainConfig(encoder={"arch": ARCH}, recipe={"name": "mae", "augment": "dino"},
                       data={"fast_decode": True})  # fmt: skip
    with pytest.raises(ValueError, match="view 'second' is not a kind of crop"):
        photometric_ops("dino", "second")
    with pytest.raises(ValueError, match="augment 'x' is not an augmentation set"):
        photometric_ops("x", "first")


def test_engine_builds_each_views_pipeline_from_the_recipe(tiny_imagefolder, tmp_path, monkeypatch):
    import pretrain.engine as engine
    from pretrain.engine import pretrain

    built: list = []
    checked = engine.imagefolder_checked

    def capture(root, split, transform, **kw):
        built.append(transform)
        return checked(root, split, transform, **kw)

    monkeypatch.setattr(engine, "imagefolder_checked", capture)
    train = TWO_STEP_TRAIN
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": ARCH},
                         recipe=MICRO_IBOT_LOCAL, train=train)  # fmt: skip
    res = pretrain(cfg, tmp_path / "run", log=lambda m: None)
    assert res.steps == 2 and math.isfinite(res.final_loss)
    mv = built[0]
    assert isinstance(mv, MultiView) and (mv.views, mv.local_views) == (2, 2)
    _check_dino_ops(mv.transform.transforms[2:-2], "first")
    _check_dino_ops(mv.rest.transforms[2:-2], "other")
    _check_dino_ops(mv.local.transforms[2:-2], "local")
    # augment: none builds the crop and flip alone, one transform for every global view
    built.clear()
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": ARCH},
                         recipe={**MICRO_IBOT_LOCAL, "augment": "none"}, train=train)  # fmt: skip
    pretrain(cfg, tmp_path / "plain", log=lambda m: None)
    mv = built[0]
    assert len(mv.transform.transforms) == len(mv.rest.transforms) == 4
    assert len(mv.local.transforms) == 4
