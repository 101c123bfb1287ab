"""Frozen dense probes (linear_seg, knn_seg, linear_depth): metrics against brute-force counts and
hand computations, the NYU layout checks, the synthetic depth data, and tiny runs above chance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from downstream.base import TaskContext, get_task
from downstream.dense_probe import (
    knn_patch_predict,
    miou_aacc,
    patch_label_dists,
    seg_counts,
)
from downstream.depth_probe import (
    check_nyu,
    depth_metrics,
    eval_mask,
    mean_metrics,
    read_depth,
    sig_loss,
)
from harness.core.config import DataConfig, EncoderConfig, parse_task_config
from harness.core.data.datasets import DatasetError
from harness.core.data.shapes import ShapesSpec, ensure_shapes, render_scene
from harness.core.data.shapes_depth import depth_fingerprint, ensure_shapes_depth, scene_depth
from pretrain.encoders.vit import ViTEncoder

SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=64,
                  train_scenes=24, val_scenes=8, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.getbasetemp() / "dense-cache"
    return ensure_shapes(SPEC, cache_root=cache), ensure_shapes_depth(SPEC, cache_root=cache)


# --------------------------------------------------------------------------- metrics


def _brute_miou(preds: list[np.ndarray], labels: list[np.ndarray], k: int) -> tuple[float, float]:
    inter, union, right, total = [0] * k, [0] * k, 0, 0
    for pred, label in zip(preds, labels, strict=True):
        for p, t in zip(pred.ravel().tolist(), label.ravel().tolist(), strict=True):
            if t == 255:
                continue
            total += 1
            right += p == t
            for c in range(k):
                inter[c] += p == c and t == c
                union[c] += p == c or t == c
    ious = [inter[c] / union[c] for c in range(k) if union[c] > 0]
    return 100 * sum(ious) / len(ious), 100 * right / total


def test_miou_and_aacc_equal_a_brute_force_count():
    rng = np.random.default_rng(0)
    k = 5
    preds = [rng.integers(0, 4, (6, 7)) for _ in range(3)]  # class 4 never predicted ...
    labels = [rng.choice([0, 1, 2, 255], (6, 7)) for _ in range(3)]  # ... nor labelled: no union
    counts = sum(seg_counts(torch.from_numpy(p), torch.from_numpy(t), k)
                 for p, t in zip(preds, labels, strict=True))  # fmt: skip
    miou, aacc, per_class = miou_aacc(counts)
    want_miou, want_aacc = _brute_miou(preds, labels, k)
    assert miou == pytest.approx(want_miou, abs=1e-9)
    assert aacc == pytest.approx(want_aacc, abs=1e-9)
    assert per_class[4] is None and per_class[3] == 0.0  # 3: predicted, never labelled


def test_depth_metrics_by_hand():
    pred, gt = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.5, 2.0])
    m = depth_metrics(pred, gt)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 4) / 3))
    assert m["abs_rel"] == pytest.approx((0 + 0.2 + 1) / 3)
    # max ratios 1, 1.25, 2: 1.25 is not below 1.25; 2 is above 1.25^3 = 1.953
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((100 / 3, 200 / 3, 200 / 3))
    both = mean_metrics([m, depth_metrics(gt, gt)])
    assert both["rmse"] == pytest.approx(m["rmse"] / 2)  # averaged per image
    assert both["delta1"] == pytest.approx((100 / 3 + 100) / 2)


def test_eval_mask_bounds_and_eigen_crop():
    gt = torch.full((480, 640), 5.0)
    gt[100, 100] = 0.0  # no measurement
    gt[200, 200] = 12.0  # beyond max_depth
    mask = eval_mask(gt, 1e-3, 10.0, eigen_crop=True)
    assert int(mask.sum()) == (471 - 45) * (601 - 41) - 2
    assert not mask[0, 0] and mask[45, 41] and not mask[471, 601]
    assert int(eval_mask(gt, 1e-3, 10.0, eigen_crop=False).sum()) == 480 * 640 - 2
    small = torch.full((8, 8), 5.0)
    assert bool(eval_mask(small, 1e-3, 10.0, eigen_crop=True).all())  # not NYU's size: no crop


def test_sig_loss_is_scale_invariant_up_to_its_mean_term():
    gt = torch.rand(2, 5, 5) * 4 + 1
    assert float(sig_loss(gt[:, None], gt)) == pytest.approx(0.0, abs=1e-6)
    g = math.log(2 * 1 + 1e-3) - math.log(1 + 1e-3)  # pred = 2 gt at gt = 1: g constant
    ones = torch.ones(1, 4, 4)
    assert float(sig_loss(2 * ones[:, None], ones)) == pytest.approx(math.sqrt(0.15) * g, rel=1e-5)


# --------------------------------------------------------------------------- kNN segmentation


def test_patch_label_dists_by_loops():
    rng = np.random.default_rng(1)
    labels = torch.from_numpy(rng.choice([0, 1, 2, 255], (2, 4, 6)))  # 2 x 3 patches of 2 x 2
    got = patch_label_dists(labels, (2, 3), 3, majority=False)
    maj = patch_label_dists(labels, (2, 3), 3, majority=True)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                px = labels[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten().tolist()
                valid = [v for v in px if v != 255]
                want = [valid.count(c) / len(valid) if valid else 0.0 for c in range(3)]
                assert got[n, i * 3 + j].tolist() == pytest.approx(want)
                if valid:
                    top = max(range(3), key=lambda c: (valid.count(c), -c))
                    assert maj[n, i * 3 + j].tolist() == [float(c == top) for c in range(3)]
                else:
                    assert maj[n, i * 3 + j].sum() == 0


def test_knn_patch_predict_equals_brute_force():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(12, 4), dim=1)
    labels = torch.softmax(torch.randn(12, 3), dim=1)
    query = F.normalize(torch.randn(5, 4), dim=1)
    got = knn_patch_predict(bank, labels, query, k=4, temperature=0.1, chunk_size=2)
    for q in range(5):
        sims = [float(query[q] @ bank[m]) for m in range(12)]
        top = sorted(range(12), key=lambda m: -sims[m])[:4]
        w = [math.exp(sims[m] / 0.1) for m in top]
        want = [sum(wi * float(labels[m, c]) for wi, m in zip(w, top, strict=True)) / sum(w)
                for c in range(3)]  # fmt: skip
        assert got[q].tolist() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- data


def test_synthetic_depth_follows_the_scene(roots):
    _, depth_root = roots
    scene = render_scene(SPEC, "val", 3)
    want = scene_depth(SPEC, "val", 3, scene)
    got = read_depth(depth_root / "test" / "sync_depth_00003.png")
    assert got.shape == (64, 64)
    assert np.abs(got - want).max() <= 0.0005 + 1e-6  # millimetre PNG
    inst = scene.instances[0]
    r = np.linalg.norm(inst.polygon - inst.polygon.mean(axis=0), axis=1).max()
    assert want[inst.mask] == pytest.approx(0.4 * 64 / r)
    bg = ~np.any([i.mask for i in scene.instances], axis=0)
    col = want[:, np.argmax(bg.all(axis=0))] if bg.all(axis=0).any() else None
    if col is not None:  # the background plane: nearer row by row
        assert np.all(np.diff(col) < 0)
    img = np.asarray(Image.open(depth_root / "test" / "rgb_00003.jpg"))
    assert img.shape == (64, 64, 3)
    assert depth_fingerprint(SPEC) != SPEC.fingerprint()  # its own cache key
    assert len((depth_root / "nyu_train.txt").read_text().split("\n")) == 24 + 1


def _copy_nyu(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_check_nyu_names_a_depth_map_of_the_wrong_size(roots, tmp_path):
    root = _copy_nyu(roots[1], tmp_path / "nyu")
    bad = root / "train" / "sync_depth_00002.png"
    Image.fromarray(np.zeros((30, 40), np.uint16)).save(bad)
    with pytest.raises(DatasetError, match="40x30") as err:
        get_task("linear_depth").check_data(parse_task_config({"name": "linear_depth"}),
                                            DataConfig(source=str(root)))  # fmt: skip
    assert str(bad) in str(err.value) and "expected a 64x64 depth map" in str(err.value)


def test_check_nyu_refuses_8_bit_depth_and_missing_files(roots, tmp_path):
    root = _copy_nyu(roots[1], tmp_path / "nyu")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "test" / "sync_depth_00001.png")
    with pytest.raises(DatasetError, match="16-bit PNG"):
        check_nyu(root)
    (root / "test" / "sync_depth_00001.png").unlink()
    (root / "test" / "rgb_00004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\) listed in .*nyu_test.txt are missing"):
        check_nyu(root)


# --------------------------------------------------------------------------- tiny runs


def _run(name: str, source: Path, img_size: int = 64, **cfg):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32", img_size=img_size))  # patch 8
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    ctx = TaskContext(data=DataConfig(source=str(source)), seed=0, device=torch.device("cpu"),
                      out_dir=source, log=lambda m: None)  # fmt: skip
    res = get_task(name).run(enc, parse_task_config({"name": name, **cfg}), ctx)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    return res


def _colour_ade(root: Path, n_train: int = 16, n_val: int = 6) -> Path:
    """A tiny ADE20K-layout set whose 3 classes are colours (decodable from any patch
    embedding): 8 x 8 blocks of red, green or blue on grey (label 0, ignored), 32 px."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220]], np.uint8)
    for split, d, n in (("train", "training", n_train), ("val", "validation", n_val)):
        (root / "images" / d).mkdir(parents=True)
        (root / "annotations" / d).mkdir(parents=True)
        for i in range(n):
            img = np.full((32, 32, 3), 128, np.uint8)
            lab = np.zeros((32, 32), np.uint8)
            for bi in range(4):
                for bj in range(4):
                    c = rng.integers(0, 4)
                    if c < 3:
                        img[8 * bi : 8 * bi + 8, 8 * bj : 8 * bj + 8] = colours[c]
                        lab[8 * bi : 8 * bi + 8, 8 * bj : 8 * bj + 8] = c + 1
            Image.fromarray(img).save(root / "images" / d / f"{split}_{i:04d}.jpg", quality=95)
            Image.fromarray(lab).save(root / "annotations" / d / f"{split}_{i:04d}.png")
    (root / "classes.json").write_text('["red", "green", "blue"]')
    return root


@pytest.mark.slow
def test_linear_seg_and_knn_seg_beat_chance(tmp_path):
    ade = _colour_ade(tmp_path / "ade")
    lin = _run("linear_seg", ade, img_size=32, epochs=15, batch_size=4, lrs=[1e-2, 1e-1])
    assert [h["lr"] for h in lin.details["heads"]] == [1e-2, 1e-1]
    assert lin.details["best_lr"] in (1e-2, 1e-1) and lin.details["num_holdout"] == 2
    knn = _run("knn_seg", ade, img_size=32, k=5, temperature=0.1)
    # chance: a uniformly random class per pixel is right on 1 / 3 of the labelled pixels
    assert lin.metrics["aacc"] > 100 / 3 + 20, lin.metrics
    assert knn.metrics["aacc"] > 100 / 3 + 20, knn.metrics
    assert knn.details["bank_patches"] > 0


@pytest.mark.slow
def test_linear_depth_beats_the_mean_depth(roots):
    res = _run("linear_depth", roots[1], epochs=10, batch_size=8, lrs=[1e-2, 3e-2], label_size=32)
    gts = [read_depth(roots[1] / "test" / f"sync_depth_{i:05d}.png") for i in range(8)]
    tr = np.concatenate([read_depth(roots[1] / "train" / f"sync_depth_{i:05d}.png").ravel()
                         for i in range(24)])  # fmt: skip
    const = mean_metrics([depth_metrics(torch.full((g.size,), float(tr.mean())),
                                        torch.from_numpy(g.ravel())) for g in gts])  # fmt: skip
    assert res.metrics["rmse"] < const["rmse"], (res.metrics, const)
    assert set(res.metrics) == {"rmse", "abs_rel", "delta1", "delta2", "delta3"}


def test_knn_seg_bank_keeps_a_quota_per_image(tmp_path):
    ade = _colour_ade(tmp_path / "ade", n_train=8, n_val=2)
    full = _run("knn_seg", ade, img_size=32, k=3)
    capped = _run("knn_seg", ade, img_size=32, k=3, max_bank=12)  # ceil(12 / 8) = 2 per image
    assert capped.details["bank_patches"] == 16 < full.details["bank_patches"]


def test_leaderboard_units_of_the_dense_metrics():
    from harness.leaderboard import default_unit

    units = [default_unit(m) for m in ("miou", "aacc", "rmse", "abs_rel", "delta1", "delta3")]
    assert units == ["%", "%", "m", None, "%", "%"]
