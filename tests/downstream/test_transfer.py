"""The transfer suite: the synthetic sets, the mean rank by hand, a tiny run on two synthetic
sets through the linear probe and kNN (their own loops), bad configs refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from downstream.base import TaskContext, get_task
from harness.core.config import DataConfig, EncoderConfig, parse_task_config
from harness.core.data.datasets import imagefolder_classes
from harness.core.data.shapes import ShapesSpec
from harness.core.data.shapes_transfer import TransferSetSpec, ensure_transfer_set
from harness.core.errors import UserError
from harness.leaderboard import leaderboard, mean_rank
from pretrain.encoders.vit import ViTEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from test_report import record  # noqa: E402

FLAT = {"classes": ["circle", "square", "star"], "image_size": 16, "train_per_class": 6,
        "val_per_class": 3, "background": "flat", "distractors": 0}
TEXTURED = {"classes": ["triangle", "hexagon"], "image_size": 16, "train_per_class": 6,
            "val_per_class": 3, "scale": [0.2, 0.3]}


def test_synthetic_sets_are_imagefolders_with_their_own_cache_key(tmp_path):
    spec = TransferSetSpec.from_dict(FLAT)
    root = ensure_transfer_set(spec, tmp_path)
    assert root == tmp_path / f"shapes-transfer-{spec.fingerprint()}" / "imagefolder"
    assert imagefolder_classes(root, "train") == ["circle", "square", "star"]
    assert len(list((root / "val" / "star").glob("*.png"))) == 3
    stamp = (root / "train" / "circle" / "train_000000.png").stat().st_mtime_ns
    assert ensure_transfer_set(spec, tmp_path) == root  # cached, not rewritten
    assert (root / "train" / "circle" / "train_000000.png").stat().st_mtime_ns == stamp
    other = TransferSetSpec.from_dict({**FLAT, "background": "textured"})
    assert other.fingerprint() != spec.fingerprint() != ShapesSpec().fingerprint()
    with pytest.raises(UserError, match="two or more distinct names"):
        TransferSetSpec.from_dict({"classes": ["circle", "blob"]})


def test_mean_rank_by_hand():
    import pandas as pd

    table = pd.DataFrame({"a": [90.0, 80.0, 70.0], "b": [50.0, 60.0, 60.0],
                          "c": [1.0, None, 3.0]}, index=["x", "y", "z"])  # fmt: skip
    # a: x 1, y 2, z 3; b: x 3, y 1.5, z 1.5; c: z 1, x 2 (y unranked)
    assert mean_rank(table).to_dict() == pytest.approx({"x": 2.0, "y": 1.75, "z": 11 / 6})
    assert mean_rank(table[["a"]], higher_is_better=False).to_dict() == {"x": 3, "y": 2, "z": 1}


def test_leaderboard_adds_the_mean_rank_column():
    def rec(enc, a, b):
        r = record(enc, 0, {"top1_linear_probe_a": a, "top1_linear_probe_b": b,
                            "top1_linear_probe_mean": (a + b) / 2}, task="transfer")
        r.details = {"ranked": {"rank_linear_probe_mean": ["top1_linear_probe_a",
                                                           "top1_linear_probe_b"]}}
        return r

    lb = leaderboard([rec("mae", 80.0, 40.0), rec("beit", 70.0, 60.0), rec("rand", 10.0, 60.0)])
    col = "transfer/rank_linear_probe_mean"
    assert lb.mean[col].to_dict() == {"beit": 1.75, "mae": 2.0, "rand": 2.25}
    assert lb.higher_is_better[col] is False and lb.best(col) == {"beit"}
    assert lb.header("transfer/top1_linear_probe_mean") == "transfer/top1_linear_probe_mean (%)"
    assert col not in leaderboard([rec("mae", 1.0, 2.0)], metrics=["top1_linear_probe_a"]).columns


@pytest.mark.slow
def test_tiny_run_on_two_synthetic_sets(tmp_path):
    cfg = parse_task_config({
        "name": "transfer", "synthetic_cache": str(tmp_path / "synth"),
        "datasets": [{"name": "flat3", "synthetic": FLAT}, {"name": "tex2", "synthetic": TEXTURED}],
        "protocols": [{"name": "linear_probe", "lrs": [0.1], "epochs": 2, "batch_size": 8,
                       "cache_features": False},
                      {"name": "knn", "k": 3, "extra_k": [], "cache_features": False}],
    })  # fmt: skip
    task = get_task("transfer")
    names = task.metric_names(cfg)
    assert set(names) == {f"top1_{p}_{d}" for p in ("linear_probe", "knn")
                          for d in ("flat3", "tex2", "mean")}
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    ctx = TaskContext(data=DataConfig(source="shapes", eval_crop_pct=1.0), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path / "o", log=lambda m: None)
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(names)
    for p in ("linear_probe", "knn"):
        assert res.metrics[f"top1_{p}_mean"] == pytest.approx(
            (res.metrics[f"top1_{p}_flat3"] + res.metrics[f"top1_{p}_tex2"]) / 2)
    lp = res.details["datasets"]["tex2"]["linear_probe"]
    assert lp["details"]["num_classes"] == 2 and lp["details"]["num_val"] == 6
    assert res.details["ranked"]["rank_knn_mean"] == ["top1_knn_flat3", "top1_knn_tex2"]
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_bad_transfer_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one of root"):
        parse_task_config({"name": "transfer", "datasets": [{"name": "a"}]})
    with pytest.raises(ValueError, match=r"not among \['linear_probe'"):
        parse_task_config({"name": "transfer", "protocols": [{"name": "segmentation"}]})
    with pytest.raises(ValueError, match="not 'mean'"):
        parse_task_config({"name": "transfer", "datasets": [{"name": "mean", "root": "x"}]})
    with pytest.raises(ValueError, match="distinct"):
        parse_task_config({"name": "transfer", "datasets": [{"name": "a", "root": "x"},
                                                            {"name": "a", "root": "y"}]})
    cfg = parse_task_config({"name": "transfer", "datasets": [
        {"name": "cars", "root": str(tmp_path / "no-cars")}]})
    with pytest.raises(UserError, match="no-cars does not exist"):
        get_task("transfer").check_data(cfg, DataConfig())
