"""Weighted kNN (DINO): the vote by hand, the task end to end, cache reuse, unreadable images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from downstream.base import TaskContext, get_task
from downstream.knn import KNNConfig, knn_predict
from downstream.linear_probe import LinearProbeConfig
from harness.config import DataConfig, EncoderConfig
from harness.data.datasets import DatasetError
from pretrain.encoder import ViTEncoder


def _ctx(root, tmp_path):
    return TaskContext(
        data=DataConfig(source=str(root)),
        seed=0,
        device=torch.device("cpu"),
        out_dir=tmp_path / "task",
        log=lambda m: None,
    )


def test_knn_vote_by_hand():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    q = F.normalize(torch.tensor([[1.0, 0.2]]), dim=1)
    scores = knn_predict(train, labels, q, num_classes=2, k=3, temperature=0.1)
    sims = (q @ train.T)[0]
    top = sims.topk(3)
    expect = torch.zeros(2)
    for s, i in zip(top.values, top.indices, strict=True):
        expect[labels[i]] += torch.exp(s / 0.1)
    assert torch.allclose(scores[0], expect)
    assert scores.argmax() == 0
    # chunking does not change anything; k larger than the train set is clipped
    many = F.normalize(torch.randn(7, 2), dim=1)
    assert torch.allclose(
        knn_predict(train, labels, many, 2, 10, 0.07, chunk_size=3),
        knn_predict(train, labels, many, 2, 4, 0.07, chunk_size=100),
    )


def test_knn_defaults_are_dinos():
    cfg = KNNConfig()
    assert (cfg.k, cfg.temperature, cfg.pooling) == (20, 0.07, "cls")


def test_knn_task_reuses_the_probe_cache(tiny_imagefolder, tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cache = str(tmp_path / "cache")
    get_task("linear_probe").run(
        enc,
        LinearProbeConfig(lrs=[0.1], epochs=1, batch_size=8, cache_dir=cache),
        _ctx(tiny_imagefolder, tmp_path),
    )
    res = get_task("knn").run(
        enc, KNNConfig(k=5, extra_k=[1], cache_dir=cache), _ctx(tiny_imagefolder, tmp_path)
    )
    assert res.details["feature_cache"] == {"train": True, "val": True}
    assert 0.0 <= res.metrics["top1"] <= res.metrics["top5"] <= 100.0
    assert set(res.details["by_k"]) == {"1", "5"}
    fresh = get_task("knn").run(
        enc, KNNConfig(k=5, extra_k=[1], cache_features=False), _ctx(tiny_imagefolder, tmp_path)
    )
    assert fresh.metrics == res.metrics  # the cache holds what extraction computes


def test_knn_reads_a_float16_cache_the_probe_wrote(tiny_imagefolder, tmp_path):
    from harness.config import hashed_dump

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cache = str(tmp_path / "cache")
    probe = LinearProbeConfig(lrs=[0.1], epochs=1, batch_size=8, cache_dir=cache,
                              cache_dtype="float16")
    get_task("linear_probe").run(enc, probe, _ctx(tiny_imagefolder, tmp_path))
    lines: list[str] = []
    ctx = _ctx(tiny_imagefolder, tmp_path)
    ctx.log = lines.append
    res = get_task("knn").run(
        enc, KNNConfig(k=5, extra_k=[], cache_dir=cache, cache_dtype="float16"), ctx
    )
    assert res.details["feature_cache"] == {"train": True, "val": True}
    assert sum("read from cache" in m for m in lines) == 2, lines
    # float32 (the default) is another cache entry: extracted, not read
    lines.clear()
    res32 = get_task("knn").run(enc, KNNConfig(k=5, extra_k=[], cache_dir=cache), ctx)
    assert res32.details["feature_cache"] == {"train": False, "val": False}
    assert not any("read from cache" in m for m in lines)
    # the new option left at its default does not change the hashed config of existing runs
    assert "cache_dtype" not in hashed_dump(KNNConfig())
    assert hashed_dump(KNNConfig(cache_dtype="float16"))["cache_dtype"] == "float16"


def test_unreadable_images_are_skipped_and_counted_or_fatal(tiny_imagefolder, tmp_path):
    (tiny_imagefolder / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    (tiny_imagefolder / "val" / "class1" / "cut.png").write_bytes(
        (tiny_imagefolder / "val" / "class1" / "0.png").read_bytes()[:60]
    )  # truncated
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    res = get_task("knn").run(
        enc, KNNConfig(k=3, extra_k=[], cache_features=False), _ctx(tiny_imagefolder, tmp_path)
    )
    assert res.details["skipped_images"] == {"train": 1, "val": 1}
    assert res.details["num_train"] == 24 and res.details["num_val"] == 12
    with pytest.raises(DatasetError, match=r"unreadable image .*broken\.png.*without --strict"):
        get_task("knn").run(
            enc, KNNConfig(strict_data=True, cache_features=False), _ctx(tiny_imagefolder, tmp_path)
        )


def test_swin_needs_avg_pooling(tiny_imagefolder, tmp_path):
    from pretrain.swin import SwinEncoder

    enc = SwinEncoder(EncoderConfig(arch="swin_micro_32"))
    with pytest.raises(ValueError, match="pooling: avg"):
        get_task("knn").run(enc, KNNConfig(cache_features=False), _ctx(tiny_imagefolder, tmp_path))
    res = get_task("knn").run(
        enc,
        KNNConfig(pooling="avg", k=3, extra_k=[], cache_features=False),
        _ctx(tiny_imagefolder, tmp_path),
    )
    assert res.details["pooling"] == "avg"


def test_cli_strict_flag_makes_unreadable_images_fatal(tiny_imagefolder, tmp_path):
    from harness.cli import main
    from harness.records import load_records

    (tiny_imagefolder / "train" / "class2" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    args = [
        "eval",
        "knn",
        "--encoder",
        "random:vit_micro_32",
        "--data",
        str(tiny_imagefolder),
        "--out",
        str(tmp_path / "runs"),
        "--set",
        "tasks.0.cache_features=false",
    ]
    assert main([*args, "--name", "lenient"]) == 0
    assert main([*args, "--name", "strict", "--strict"]) == 0
    recs = {r.encoder.name: r for r in load_records(tmp_path / "runs" / "eval" / "records")}
    assert (
        recs["lenient"].status == "ok" and recs["lenient"].details["skipped_images"]["train"] == 1
    )
    assert recs["strict"].status == "failed" and "broken.jpg" in recs["strict"].error.message
