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
from harness.core.config import DataConfig, EncoderConfig
from pretrain.encoders.vit import ViTEncoder


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
    g = torch.Generator().manual_seed(
        123
    )  # not the heads' seed: their init would match the centers
    n, d, c = 600, 16, 10
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    cfg = LinearProbeConfig(pooling=["cls"], lrs=[1e-6, 0.1], epochs=8, batch_size=100)
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
    cfg = LinearProbeConfig(
        lrs=[0.1, 1.0],
        epochs=5,
        batch_size=8,
        pooling=["cls", "avg"],
        last_blocks=[1],
        cache_dir=str(tmp_path / "cache"),
    )
    ctx = TaskContext(
        data=DataConfig(source=str(tiny_imagefolder)),
        seed=0,
        device=torch.device("cpu"),
        out_dir=tmp_path,
        log=lambda m: None,
    )
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(task.metrics)
    assert 0.0 <= res.metrics["top1"] <= res.metrics["top5"] <= 100.0
    heads = res.details["heads"]
    assert len(heads) == 4  # 2 poolings x 2 lrs
    best = max(heads, key=lambda h: h["holdout_top1"])
    assert res.details["best_head"] == {
        "pooling": best["pooling"],
        "last_blocks": 1,
        "lr": best["lr"],
    }
    assert res.metrics["top1"] == best["val_top1"]  # chosen on holdout, reported on val
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # frozen


def test_unknown_task_suggests():
    with pytest.raises(KeyError, match="did you mean 'linear_probe'"):
        get_task("linear_prob")


# --------------------------------------------------------------------------- grid, cache, views


def _ctx(root, tmp_path, log=None):
    return TaskContext(
        data=DataConfig(source=str(root)),
        seed=0,
        device=torch.device("cpu"),
        out_dir=tmp_path / "task",
        log=log or (lambda m: None),
    )


def test_features_select_follows_dinov2_inputs():
    from downstream.features import Features

    cls = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)  # [N, V, blocks, D]
    avg = -cls
    f = Features({"cls": cls, "avg": avg}, torch.tensor([0, 1]), 0, 0.0, None, False)
    assert torch.equal(f.select("cls", 1), cls[:, :, 2])
    assert torch.equal(f.select("avg", 2), avg[:, :, 1:].flatten(2))
    both = f.select(
        "cls_avg", 2
    )  # class tokens of the last 2 blocks + mean patch token of the last
    assert both.shape == (2, 1, 12) and torch.equal(both[..., 8:], avg[:, :, 2])


def test_grid_cache_and_views(tiny_imagefolder, tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = LinearProbeConfig(
        pooling=["cls", "cls_avg"],
        last_blocks=[1, 4],
        lrs=[0.1],
        epochs=2,
        batch_size=8,
        train_views=2,
        cache_dir=str(tmp_path / "cache"),
    )
    task = get_task("linear_probe")
    res = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    heads = {(h["pooling"], h["last_blocks"]) for h in res.details["heads"]}
    assert heads == {("cls", 1), ("cls", 2), ("cls_avg", 1), ("cls_avg", 2)}  # 4 clipped to depth 2
    assert res.details["train_views"] == 2
    assert res.details["feature_cache"]["train"] is False
    assert len(list((tmp_path / "cache").glob("*-v2-*-b2.safetensors"))) == 1
    again = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    assert again.details["feature_cache"] == {
        **res.details["feature_cache"],
        "train": True,
        "val": True,
    }
    assert again.metrics == res.metrics  # same cached features, same seeds
    # another encoder's weights are another key
    with torch.no_grad():
        enc.vit.norm.weight.mul_(2)
    other = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    assert other.details["feature_cache"]["train"] is False


def test_swin_and_beit_encoders_probe(tiny_imagefolder, tmp_path):
    from pretrain.encoders.beit import BeitEncoder
    from pretrain.encoders.swin import SwinEncoder

    task = get_task("linear_probe")
    cfg = LinearProbeConfig(
        lrs=[0.1], epochs=1, batch_size=8, last_blocks=[1, 2], cache_features=False
    )
    torch.manual_seed(0)
    res = task.run(
        SwinEncoder(EncoderConfig(arch="swin_micro_32")), cfg, _ctx(tiny_imagefolder, tmp_path)
    )
    assert {(h["pooling"], h["last_blocks"]) for h in res.details["heads"]} == {("avg", 1)}
    beit = BeitEncoder(
        EncoderConfig(arch="vit_micro_32"),
        {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
    )
    res = task.run(beit, cfg, _ctx(tiny_imagefolder, tmp_path))
    assert len(res.details["heads"]) == 6  # 3 poolings x last 1, 2 blocks


# --------------------------------------------------------------------------- faithful mode


def test_lars_scales_matrices_by_trust_ratio_and_not_biases():
    from downstream.lars import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=1.0, weight_decay=0.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.0, 2.0]])  # ||g|| = 2
    b.grad = torch.tensor([0.5])
    opt.step()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 0.001 * 5 / 2 * 2.0]]))
    assert torch.allclose(b, torch.tensor([0.5]))  # plain SGD for 1-d parameters


def test_faithful_avg_pooling_is_maes_global_pool():
    """MAE's ``global_pool``: mean patch token before the final norm, then a fresh LayerNorm;
    timm builds the same with ``global_pool='avg', fc_norm=True`` (the final norm dropped)."""
    import timm

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32", pos_embed="learned")).eval()
    with torch.no_grad():
        enc.vit.norm.weight.uniform_(0.5, 2.0)  # a final norm that matters
        enc.vit.norm.bias.normal_()
    kwargs = {**enc.cfg.timm_kwargs(), "global_pool": "avg", "fc_norm": True, "num_classes": 0}
    ref = timm.create_model(enc.cfg.timm_name, pretrained=False, **kwargs).eval()
    missing, unexpected = ref.load_state_dict(enc.timm_state_dict(), strict=False)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight"]
    assert sorted(unexpected) == ["norm.bias", "norm.weight"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = enc.global_pool(x)
        assert torch.allclose(got, ref(x), atol=1e-5)
        assert not torch.allclose(got, enc.pool(enc.forward_features(x), "avg"), atol=1e-3)


def test_faithful_probe_runs_and_resumes(tiny_imagefolder, tmp_path):
    from downstream.linear_probe_faithful import LinearProbeFaithfulConfig

    class Stop(Exception):
        pass

    def stop_after_epoch_1(msg):
        if "epoch 1/3" in msg:
            raise Stop

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = LinearProbeFaithfulConfig(epochs=3, warmup_epochs=1, batch_size=8, micro_batch_size=4)
    assert (
        LinearProbeFaithfulConfig().batch_size == 16384 and LinearProbeFaithfulConfig().epochs == 90
    )
    task = get_task("linear_probe_faithful")
    full = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "a"))
    assert 0.0 <= full.metrics["top1"] <= full.metrics["top5"] <= 100.0
    assert full.details["steps"] == 3 * (24 // 8)
    with pytest.raises(Stop):
        task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "b", stop_after_epoch_1))
    logs = []
    resumed = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "b", logs.append))
    assert any("resumed after epoch 1" in m for m in logs)
    assert resumed.metrics == full.metrics
    assert resumed.details["history"] == full.details["history"]


def test_faithful_batch_larger_than_data_says_what_to_do(tiny_imagefolder, tmp_path):
    from downstream.linear_probe_faithful import LinearProbeFaithfulConfig
    from harness.core.config import ConfigError

    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    with pytest.raises(ConfigError, match="fewer than one batch of 16384"):
        get_task("linear_probe_faithful").run(
            enc, LinearProbeFaithfulConfig(), _ctx(tiny_imagefolder, tmp_path)
        )


def test_bench_probe_puts_both_modes_side_by_side(tiny_imagefolder, tmp_path, capsys):
    import json

    from harness.cli import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench-probe",
                "--work",
                str(tmp_path / "work"),
                "--encoder",
                "random:vit_micro_32",
                "--data",
                str(tiny_imagefolder),
                "--faithful-batch",
                "8",
                "--faithful-epochs",
                "2",
                "--faithful-warmup",
                "1",
                "--fast-epochs",
                "2",
                "--fast-batch",
                "8",
                "--knn",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    (faithful,) = res["faithful"]
    assert faithful["time_ratio_over_fast"] > 0
    assert faithful["top1_delta_fast_minus_faithful"] == res["fast"]["top1"] - faithful["top1"]
    assert "knn" in res and "time ratio faithful / fast" in capsys.readouterr().out
    assert list((tmp_path / "work" / "features").glob("*.safetensors"))  # --work keeps the cache


# --------------------------------------------------------------------------- cache keys


def _age(root, seconds=3600):
    """Date every file of ``root`` back (data written some time before it is evaluated)."""
    import os
    import time

    t = time.time_ns() - seconds * 10**9
    for f in root.rglob("*.png"):
        os.utime(f, ns=(t, t))


def test_images_rewritten_in_place_miss_the_cache(tiny_imagefolder, tmp_path):
    """The issue's case: same paths and labels, other pixels; the cache must not answer."""
    from conftest import make_imagefolder

    _age(tiny_imagefolder)
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = LinearProbeConfig(pooling=["cls"], last_blocks=[1], lrs=[0.1], epochs=3, batch_size=8,
                            cache_dir=str(tmp_path / "cache"))
    task = get_task("linear_probe")
    task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    make_imagefolder(tiny_imagefolder, seed=1)  # the same files, rewritten with other images
    again = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    assert again.details["feature_cache"]["train"] is False
    assert again.details["feature_cache"]["val"] is False
    fresh = task.run(enc, cfg.model_copy(update={"cache_features": False}),
                     _ctx(tiny_imagefolder, tmp_path))
    assert again.metrics == fresh.metrics  # the figure of the new images


# --------------------------------------------------------------------------- grid edges


def _heads(scores: dict[tuple[float, int], float]) -> list[dict]:
    return [{"pooling": "cls", "lr": lr, "last_blocks": k, "holdout_top1": s}
            for (lr, k), s in scores.items()]


def test_a_winner_on_an_edge_of_the_lr_grid_is_reported():
    from downstream.linear_probe import grid_edges

    top = grid_edges(_heads({(0.1, 1): 50.0, (1.0, 1): 60.0, (10.0, 1): 70.0}), "holdout_top1")
    assert [(e["axis"], e["value"], e["edge"]) for e in top] == [("lr", 10.0, "highest")]
    assert "lr 10 is the highest of the grid [0.1, 1, 10]" in top[0]["message"]
    assert "widen task.lrs" in top[0]["message"]
    low = grid_edges(_heads({(0.1, 1): 70.0, (1.0, 1): 60.0, (10.0, 1): 50.0}), "holdout_top1")
    assert [(e["axis"], e["edge"]) for e in low] == [("lr", "lowest")]


def test_an_interior_winner_or_a_tie_reaching_the_interior_is_not_an_edge():
    from downstream.linear_probe import grid_edges

    assert grid_edges(_heads({(0.1, 1): 50.0, (1.0, 1): 70.0, (10.0, 1): 60.0}),
                      "holdout_top1") == []
    assert grid_edges(_heads({(0.1, 1): 70.0, (1.0, 1): 70.0, (10.0, 1): 60.0}),
                      "holdout_top1") == []
    assert grid_edges(_heads({(0.1, 1): 70.0}), "holdout_top1") == []  # one value: no grid


def test_last_blocks_edge_unless_it_is_one_or_the_encoders_depth():
    from downstream.linear_probe import grid_edges

    heads = _heads({(0.1, 1): 50.0, (1.0, 1): 60.0, (0.1, 4): 80.0, (1.0, 4): 40.0, (3.0, 1): 55.0})
    assert [(e["axis"], e["value"], e["edge"]) for e in grid_edges(heads, "holdout_top1")] == [
        ("lr", 0.1, "lowest"), ("last_blocks", 4, "highest")]
    capped = grid_edges(heads, "holdout_top1", bounds={"last_blocks": (1, 4)})
    assert [e["axis"] for e in capped] == ["lr"]
    # a winner at last_blocks 1 (nothing below it) is no edge either; 2 of [2, 4] is one
    low = _heads({(0.1, 1): 50.0, (1.0, 1): 90.0, (3.0, 1): 60.0, (1.0, 4): 40.0})
    assert grid_edges(low, "holdout_top1", bounds={"last_blocks": (1, 4)}) == []
    two = _heads({(0.1, 2): 50.0, (1.0, 2): 90.0, (3.0, 2): 60.0, (1.0, 4): 40.0})
    assert [(e["axis"], e["value"]) for e in grid_edges(
        two, "holdout_top1", bounds={"last_blocks": (1, 4)})] == [("last_blocks", 2)]


def test_synthetic_features_whose_best_lr_is_the_top_of_the_grid_warn():
    """Separable features: a vanishing lr leaves the heads near their init, so the largest lr
    of a grid of tiny ones wins and is reported on the edge."""
    from downstream.linear_probe import grid_edges

    g = torch.Generator().manual_seed(123)
    n, d, c = 600, 16, 10
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    cfg = LinearProbeConfig(pooling=["cls"], lrs=[1e-7, 1e-6, 0.1], epochs=8, batch_size=100)
    heads = train_heads({"cls": x}, y, c, cfg, seed=0)
    with torch.no_grad():
        table = [{"lr": lr, "last_blocks": 1, "holdout_top1": topk_accuracy(h(x), y, 1)}
                 for (_, lr), h in heads.items()]
    edges = grid_edges(table, "holdout_top1")
    assert [(e["axis"], e["value"], e["edge"]) for e in edges] == [("lr", 0.1, "highest")]


def test_the_task_logs_and_records_its_grid_edges(tiny_imagefolder, tmp_path):
    from downstream.linear_probe import DEFAULT_LRS, grid_edges

    assert get_task("linear_probe").version == 3
    assert LinearProbeConfig().lrs == list(DEFAULT_LRS) and min(DEFAULT_LRS) < 0.01
    assert max(DEFAULT_LRS) > 1.0  # version 2's winners sat at its top, 1.0
    lines: list[str] = []
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = LinearProbeConfig(lrs=[1e-9, 0.1, 1.0], epochs=3, batch_size=8, pooling=["cls"],
                            last_blocks=[1], cache_features=False)
    res = get_task("linear_probe").run(enc, cfg, _ctx(tiny_imagefolder, tmp_path, lines.append))
    want = grid_edges(res.details["heads"], "holdout_top1",
                      bounds={"last_blocks": (1, enc.num_feature_blocks)})
    assert res.details["grid_edge"] == want
    warned = [m for m in lines if "WARNING" in m]
    assert [m.split("WARNING: ", 1)[1] for m in warned] == [e["message"] for e in want]
