"""Weighted kNN (DINO): the vote by hand, the task end to end, cache reuse, unreadable images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from downstream.base import TaskContext, get_task
from downstream.knn import KNNConfig, knn_predict
from downstream.linear_probe import LinearProbeConfig
from harness.core.config import DataConfig, EncoderConfig
from harness.core.data.datasets import DatasetError
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
    from harness.core.config import hashed_dump

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
    from harness.core.records import load_records

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
    assert main([*args, "--name", "strict", "--strict"]) == 1  # a failed stage exits 1
    recs = {r.encoder.name: r for r in load_records(tmp_path / "runs" / "eval" / "records")}
    assert (
        recs["lenient"].status == "ok" and recs["lenient"].details["skipped_images"]["train"] == 1
    )
    assert recs["strict"].status == "failed" and "broken.jpg" in recs["strict"].error.message


# --------------------------------------------------------------------------- the cache key


def _knn(root, tmp_path, enc, log=None, crop=0.875, **kw):
    ctx = _ctx(root, tmp_path)
    ctx.data = DataConfig(source=str(root), eval_crop_pct=crop)
    ctx.log = log or (lambda m: None)
    cfg = KNNConfig(k=3, extra_k=[], cache_dir=str(tmp_path / "cache"), **kw)
    return get_task("knn").run(enc, cfg, ctx)


def _rewrite(root):
    """Date the files back, then write other images at the same paths (sizes and pixels)."""
    import os
    import time

    from conftest import make_imagefolder

    t = time.time_ns() - 3600 * 10**9
    for f in root.rglob("*.png"):
        os.utime(f, ns=(t, t))
    make_imagefolder(root, seed=7)


@pytest.mark.parametrize("change", ["files", "weights", "transform", "dtype", "same"])
def test_every_input_of_the_features_is_in_the_cache_key(tiny_imagefolder, tmp_path, change):
    """Change one input after a cached run: a miss, and the figure a cache-free run computes
    (``same``: nothing changed, the cache answers)."""
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    _knn(tiny_imagefolder, tmp_path, enc)
    kw: dict = {}
    if change == "files":
        _rewrite(tiny_imagefolder)
    elif change == "weights":
        with torch.no_grad():
            enc.vit.blocks[0].attn.qkv.weight.mul_(-1.5)
    elif change == "transform":
        kw["crop"] = 1.0
    elif change == "dtype":
        kw["cache_dtype"] = "float16"
    res = _knn(tiny_imagefolder, tmp_path, enc, **kw)
    hit = change == "same"
    assert res.details["feature_cache"] == {"train": hit, "val": hit}
    fresh = _knn(tiny_imagefolder, tmp_path, enc, cache_features=False, **kw)
    assert res.metrics == fresh.metrics and res.details["by_k"] == fresh.details["by_k"]


def test_a_strict_run_fails_on_features_a_lenient_run_cached(tiny_imagefolder, tmp_path):
    (tiny_imagefolder / "val" / "class2" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    lenient = _knn(tiny_imagefolder, tmp_path, enc)
    assert lenient.details["skipped_images"] == {"train": 0, "val": 1}
    lines: list[str] = []
    with pytest.raises(DatasetError, match=r"unreadable image .*class2/broken\.png.*--strict"):
        _knn(tiny_imagefolder, tmp_path, enc, log=lines.append, strict_data=True)
    assert any("read from cache" in m for m in lines)  # it was the cached path that refused
    with pytest.raises(DatasetError, match=r"broken\.png"):  # data.strict_data does the same
        ctx = _ctx(tiny_imagefolder, tmp_path)
        ctx.data = DataConfig(source=str(tiny_imagefolder), strict_data=True)
        get_task("knn").run(enc, KNNConfig(k=3, extra_k=[], cache_dir=str(tmp_path / "cache")),
                            ctx)


# --------------------------------------------------------------------------- data errors


def test_skipped_images_are_named_on_the_console_once_per_split(tiny_imagefolder, tmp_path):
    (tiny_imagefolder / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    (tiny_imagefolder / "train" / "class1" / "empty.png").write_bytes(b"")
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    for cached in (False, True):  # extracted, then read from the cache: named both times
        lines: list[str] = []
        res = _knn(tiny_imagefolder, tmp_path, enc, log=lines.append)
        assert res.details["feature_cache"]["train"] is cached
        named = [m for m in lines if "unreadable" in m]
        assert len(named) == 1, lines  # the train split, once (val has none)
        assert "skipped 2 unreadable image(s) of 26" in named[0]
        assert "class0/broken.png" in named[0] and "class1/empty.png" in named[0]


@pytest.mark.parametrize("task", ["knn", "linear_probe", "linear_probe_faithful"])
def test_a_split_of_unreadable_images_is_a_clear_error(tiny_imagefolder, tmp_path, task):
    from downstream.linear_probe_faithful import LinearProbeFaithfulConfig

    for f in (tiny_imagefolder / "val").glob("*/*.png"):
        f.write_bytes(b"garbage")
    cfg = {
        "knn": KNNConfig(k=3, extra_k=[], cache_features=False),
        "linear_probe": LinearProbeConfig(lrs=[0.1], epochs=1, batch_size=8, cache_features=False),
        "linear_probe_faithful": LinearProbeFaithfulConfig(epochs=1, warmup_epochs=0, batch_size=8),
    }[task]
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    with pytest.raises(DatasetError, match=r"all 12 images of .*val are unreadable"):
        get_task(task).run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))


@pytest.mark.parametrize("task", ["knn", "linear_probe", "linear_probe_faithful", "finetune"])
def test_a_single_class_is_an_error_for_classification(
    tiny_imagefolder, tmp_path, task, monkeypatch
):
    import shutil

    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path / "cache"))

    for split in ("train", "val"):
        for c in ("class1", "class2"):
            shutil.rmtree(tiny_imagefolder / split / c)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    from harness.core.config import parse_task_config

    cfg = parse_task_config({"name": task})
    with pytest.raises(DatasetError, match=r"train has 1 class folder\(s\) \(class0\)"):
        get_task(task).run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
