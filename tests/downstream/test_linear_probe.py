"""Fast linear probe: accuracy helpers, holdout split, head grid, end to end on tiny data."""

from __future__ import annotations

import pytest
import torch

from downstream.base import TaskContext, get_task
from downstream.linear_probe import (
    LinearProbeConfig,
    stratified_holdout,
    topk_accuracy,
    train_heads,
)
from harness.config import DataConfig, EncoderConfig
from pretrain.encoder import ViTEncoder


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    y = torch.tensor([1, 1, 2, 1])
    assert topk_accuracy(logits, y, 1) == 50.0  # rows 0 and 2
    assert topk_accuracy(logits, y, 2) == 75.0  # row 1 misses: 1 is third there
    assert topk_accuracy(logits, y, 5) == 100.0  # k clipped to the number of classes


def test_stratified_holdout_takes_every_class_and_is_disjoint():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 3)
    fit, hold = stratified_holdout(labels, 0.1, seed=0)
    assert set(fit.tolist()).isdisjoint(hold.tolist())
    assert len(fit) + len(hold) == len(labels)
    assert sorted(labels[hold].tolist()) == [0, 0, 1, 2]  # round(2.0), round(1.0), max(1, 0)
    fit2, hold2 = stratified_holdout(labels, 0.1, seed=0)
    assert torch.equal(hold, hold2)


def test_heads_learn_linearly_separable_features_and_lr_matters():
    g = torch.Generator().manual_seed(0)
    n, d, c = 600, 16, 4
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    cfg = LinearProbeConfig(pooling=["cls"], lrs=[1e-6, 0.1], epochs=20, batch_size=64)
    heads = train_heads({"cls": x}, y, c, cfg, seed=0)
    with torch.no_grad():
        acc_tiny = topk_accuracy(heads[("cls", 1e-6)](x), y, 1)
        acc_good = topk_accuracy(heads[("cls", 0.1)](x), y, 1)
    assert acc_good > 95.0
    assert acc_tiny < acc_good - 20  # a vanishing lr leaves the head near its init


def test_linear_probe_task_end_to_end(tiny_imagefolder, tmp_path):
    task = get_task("linear_probe")
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = LinearProbeConfig(lrs=[0.1, 1.0], epochs=5, batch_size=8)
    ctx = TaskContext(data=DataConfig(source=str(tiny_imagefolder)), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path, log=lambda m: None)
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(task.metrics)
    assert 0.0 <= res.metrics["top1"] <= res.metrics["top5"] <= 100.0
    heads = res.details["heads"]
    assert len(heads) == 4  # 2 poolings x 2 lrs
    best = max(heads, key=lambda h: h["holdout_top1"])
    assert res.details["best_head"] == {"pooling": best["pooling"], "lr": best["lr"]}
    assert res.metrics["top1"] == best["val_top1"]  # chosen on holdout, reported on val
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # frozen


def test_unknown_task_suggests():
    with pytest.raises(KeyError, match="did you mean 'linear_probe'"):
        get_task("linear_prob")
