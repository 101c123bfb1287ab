"""Low-shot evaluation: seeded stratified subsets, split lists (missing names refused before
anything runs), the L-BFGS logistic regression against its optimality condition and an
independent gradient descent, few-shot kNN against a brute-force vote, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downstream.base import TaskContext, get_task
from downstream.features import encoder_fingerprint, get_features
from downstream.low_shot import (
    LowShotConfig,
    fit_logreg,
    logreg_objective,
    match_split_list,
    read_split_list,
    stratified_subset,
)
from harness.core.config import DataConfig, EncoderConfig, parse_task_config
from harness.core.data.datasets import eval_transform, imagefolder_checked
from harness.core.errors import UserError
from pretrain.encoders.vit import ViTEncoder


def test_stratified_subset_has_exactly_n_per_class_and_is_seeded():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 5)[torch.randperm(22)]
    a = stratified_subset(labels, seed=3, shots=4)
    assert torch.bincount(labels[a]).tolist() == [4, 4, 4]
    assert torch.equal(a, stratified_subset(labels, seed=3, shots=4))
    assert not torch.equal(a, stratified_subset(labels, seed=4, shots=4))
    f = stratified_subset(labels, seed=0, fraction=0.5)
    assert torch.bincount(labels[f]).tolist() == [5, 4, 2]  # round(3.5) = 4, round(2.5) = 2
    assert torch.bincount(labels[stratified_subset(labels, 0, fraction=0.01)]).tolist() == [1] * 3
    with pytest.raises(UserError, match="class 2 has 5 train images, fewer than shots=6"):
        stratified_subset(labels, seed=0, shots=6)


def test_split_list_matches_by_file_name_and_names_the_missing(tmp_path):
    samples = [(f"/d/train/c{i % 2}/img_{i}.JPEG", i % 2) for i in range(6)]
    lst = tmp_path / "1percent.txt"
    lst.write_text("img_4.JPEG\n# a comment\n\n/x/c1/img_1.JPEG\n")
    assert match_split_list(read_split_list(lst), samples, str(lst)) == [1, 4]
    lst.write_text("img_1.JPEG\nnope_1.JPEG\nnope_2.JPEG\n")
    with pytest.raises(UserError, match=r"2 of 3 image names are not in the train split "
                                        r"\(first: nope_1.JPEG, nope_2.JPEG\)"):
        match_split_list(read_split_list(lst), samples, str(lst))
    with pytest.raises(UserError, match="does not exist"):
        read_split_list(tmp_path / "none.txt")
    dup = [("/d/train/a/x.png", 0), ("/d/train/b/x.png", 1)]
    with pytest.raises(UserError, match="match several train images .* as <class>/<file>"):
        match_split_list(["x.png"], dup, "l")
    assert match_split_list(["b/x.png"], dup, "l") == [1]


def test_lbfgs_logreg_reaches_the_optimum_of_an_independent_gradient_descent():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(60, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (60,), generator=g)
    l2 = 0.1
    w, b = fit_logreg(x, y, 3, l2, max_iter=500)
    # optimality: the gradient of the objective vanishes at the solution
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    gw, gb = torch.autograd.grad(logreg_objective(x, y, wg, bg, l2), [wg, bg])
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    # an independent solution: plain gradient descent (numpy) with the hand-written gradient
    # d/dW = (softmax - onehot)^T x / n + l2 W, d/db = mean(softmax - onehot)
    xn, onehot = x.numpy(), F.one_hot(y, 3).double().numpy()
    w2, b2 = np.zeros((3, 5)), np.zeros(3)
    for _ in range(3000):
        z = xn @ w2.T + b2
        p = np.exp(z - z.max(1, keepdims=True))
        r = p / p.sum(1, keepdims=True) - onehot
        w2 -= 1.5 * (r.T @ xn / 60 + l2 * w2)
        b2 -= 1.5 * r.mean(0)
    w2, b2 = torch.from_numpy(w2), torch.from_numpy(b2)
    assert w.abs().max() > 0.1  # a solution far from its zero start
    assert torch.allclose(w, w2, atol=1e-5) and torch.allclose(b, b2, atol=1e-5)


def _brute_force_knn_top1(xs, ys, xv, yv, k, t, num_classes):
    hits = 0
    for i in range(len(xv)):
        sims = sorted(((float(xv[i] @ xs[j]) / (xv[i].norm() * xs[j].norm()).item(), int(ys[j]))
                       for j in range(len(xs))), reverse=True)[:k]
        votes = [0.0] * num_classes
        for s, c in sims:
            votes[c] += math.exp(s / t)
        hits += max(range(num_classes), key=lambda c: votes[c]) == int(yv[i])
    return 100.0 * hits / len(xv)


@pytest.mark.slow
def test_tiny_run_knn_equals_brute_force_and_leaves_the_encoder(tiny_imagefolder, tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    names = ["/".join(Path(p).parts[-2:]) for p, _ in
             imagefolder_checked(tiny_imagefolder, "train", None).samples[::3]]  # fmt: skip
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(names) + "\n")
    cfg = parse_task_config({"name": "low_shot", "split_lists": {"third": str(lst)},
                             "fractions": [0.5], "shots": [3], "k": 4, "l2s": [1e-3, 1e-1],
                             "max_iter": 50, "cache_dir": str(tmp_path / "cache")})
    data = DataConfig(source=str(tiny_imagefolder), eval_crop_pct=1.0)
    ctx = TaskContext(data=data, seed=0, device=torch.device("cpu"), out_dir=tmp_path / "o",
                      log=lambda m: None)
    task = get_task("low_shot")
    task.check_data(cfg, data)
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(task.metric_names(cfg)) == {
        f"top1_{p}_{s}" for p in ("knn", "logreg") for s in ("third", "50pct", "3shot")}
    assert res.details["subsets"]["3shot"]["num_images"] == 9
    assert res.details["subsets"]["third"]["num_images"] == len(names)
    assert set(res.details["chosen_l2"].values()) <= {1e-3, 1e-1}
    assert [c["name"] for c in res.details["curves"]] == ["knn", "logreg"]
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the 3-shot kNN number from a brute-force vote over the same subset and features
    train = imagefolder_checked(tiny_imagefolder, "train", None)
    val = imagefolder_checked(tiny_imagefolder, "val", None)
    tf = eval_transform(32, 1.0)
    kw = dict(n_blocks=1, device=torch.device("cpu"), cache_dir=str(tmp_path / "cache"),
              encoder_hash=encoder_fingerprint(enc))
    ftr, fva = get_features(enc, train, "train", tf, **kw), get_features(enc, val, "val", tf, **kw)
    idx = stratified_subset(ftr.labels, 0, shots=3)
    expect = _brute_force_knn_top1(ftr.feats["cls"][idx, 0, -1], ftr.labels[idx],
                                   fva.feats["cls"][:, 0, -1], fva.labels, 4, 0.07, 3)
    assert res.metrics["top1_knn_3shot"] == pytest.approx(expect)


def test_a_split_list_naming_missing_images_fails_in_check_data(tiny_imagefolder, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("class0/0.png\nabsent_a.png\nabsent_b.png\n")
    cfg = parse_task_config({"name": "low_shot", "split_lists": {"1pct-x": str(lst)},
                             "fractions": [], "shots": []})
    with pytest.raises(UserError, match=r"2 of 3 image names .* \(first: absent_a.png"):
        get_task("low_shot").check_data(cfg, DataConfig(source=str(tiny_imagefolder)))


@pytest.mark.parametrize("bad, match", [
    ({"shots": [1]}, "1-shot leaves none"),
    ({"fractions": [0.0]}, r"in \(0, 1\]"),
    ({"split_lists": {"1 pct": "x"}}, "letters, digits"),
    ({"split_lists": {"10pct": "x"}}, "given twice"),
    ({"fractions": [], "shots": []}, "at least one subset"),
])  # fmt: skip
def test_bad_configs_are_refused_naming_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        LowShotConfig(**bad)
