"""ADE20K segmentation (mmseg UperNet on multi-level ViT features): neck, mIoU against brute
force and on a perfect prediction through the real loader, data checks, end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream._mm.vit_dense import MultiLevelNeck, default_out_indices
from harness.core.config import DataConfig, EncoderConfig
from harness.core.data.datasets import DatasetError
from harness.core.data.shapes import CLASSES, ShapesSpec, ensure_shapes

MICRO = {"arch": "vit_micro_32"}
SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=96,
                  train_scenes=16, val_scenes=4, seed=0)  # fmt: skip
ADE = Path("ade20k") / "ADEChallengeData2016"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(SPEC, cache_root=tmp_path_factory.getbasetemp() / "shapes-cache")


@pytest.fixture
def ade_copy(shapes_root: Path, tmp_path: Path) -> Path:
    """A private copy of the ADE20K layout that a test may break."""
    return Path(shutil.copytree(shapes_root / ADE, tmp_path / "ADEChallengeData2016"))


def _tiny_cfg(**kw):
    from downstream.segmentation import SegmentationConfig

    base = dict(crop_size=64, decode_channels=32, aux_channels=16, batch_size=2, max_iters=10,
                warmup_iters=2, lr=1e-3, lr_base_batch=None, checkpoint_interval=1000,
                log_level="WARNING")  # fmt: skip
    return SegmentationConfig(**{**base, **kw})


# --------------------------------------------------------------------------- model pieces


def test_beit_levels_and_neck_strides():
    assert default_out_indices(12) == [3, 5, 7, 11]  # blocks 4, 6, 8, 12 (BEiT / MAE ViT-B)
    assert default_out_indices(24) == [7, 11, 15, 23]  # ViT-L
    for patch in (16, 8):
        neck = MultiLevelNeck(24, patch).eval()
        g = 128 // patch
        outs = neck([torch.randn(1, 24, g, g) for _ in range(4)])
        assert [o.shape[-1] for o in outs] == [32, 16, 8, 4]  # strides 4, 8, 16, 32
        assert all(o.shape[1] == 24 for o in outs)  # channels kept (UperNet in_channels [D] * 4)


def test_batch_of_one_is_rejected_with_a_reason():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        _tiny_cfg(batch_size=1)


# --------------------------------------------------------------------------- metric


def _iou_metric(classes: tuple[str, ...], pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=classes)
    for pred, gt in pairs:
        metric.process([], [dict(pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
                                 gt_sem_seg=dict(data=torch.from_numpy(gt)[None]))])  # fmt: skip
    return metric.evaluate(len(pairs))


def _brute_force_miou(
    pairs: list[tuple[np.ndarray, np.ndarray]], k: int, ignore: int = 255
) -> float:
    inter, union = np.zeros(k), np.zeros(k)
    for pred, gt in pairs:
        for i in range(gt.shape[0]):
            for j in range(gt.shape[1]):
                if gt[i, j] == ignore:
                    continue
                for c in range(k):
                    p, g = pred[i, j] == c, gt[i, j] == c
                    inter[c] += p and g
                    union[c] += p or g
    present = union > 0
    return float(100 * (inter[present] / union[present]).mean())


@pytest.mark.mm
def test_brute_force_miou_equals_mmseg(monkeypatch):
    rng = np.random.default_rng(0)
    k = 5
    pairs = []
    for shape in ((6, 7), (5, 9), (8, 4)):
        gt = rng.integers(0, k - 1, shape).astype(np.int64)  # class 4 never in the ground truth
        gt[rng.random(shape) < 0.2] = 255  # ignored pixels
        pred = gt.copy()
        flip = rng.random(shape) < 0.4
        pred[flip] = rng.integers(0, k, int(flip.sum()))
        pred[pred == 255] = rng.integers(0, k)
        pairs.append((pred, gt))
    expected = _brute_force_miou(pairs, k)
    assert 0 < expected < 100
    got = _iou_metric(tuple(f"c{i}" for i in range(k)), pairs)["mIoU"]
    assert got == pytest.approx(expected, abs=0.005 + 1e-9)  # mmseg rounds to 2 decimals


@pytest.mark.mm
def test_perfect_prediction_scores_miou_100_through_the_real_loader(shapes_root, tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS, METRICS

    import downstream._mm.mmseg_modules  # noqa: F401
    from downstream.segmentation import build_mm_config, check_ade

    init_default_scope("mmseg")
    root = shapes_root / ADE
    classes = check_ade(root, None)
    assert classes == list(CLASSES)
    mm = build_mm_config(
        _tiny_cfg(), EncoderConfig(**MICRO), root, classes, None, str(tmp_path), "t"
    )
    ds = DATASETS.build(mm["val_dataloader"]["dataset"])
    metric = METRICS.build(mm["val_evaluator"])
    metric.dataset_meta = ds.metainfo
    seen = set()
    for i in range(len(ds)):
        gt = ds[i]["data_samples"].gt_sem_seg.data  # [1, H, W], reduce_zero_label applied
        seen |= set(gt.unique().tolist())
        metric.process([], [dict(pred_sem_seg=dict(data=gt), gt_sem_seg=dict(data=gt))])
    assert 255 in seen and len(seen - {255}) >= 2  # background ignored, several classes
    assert max(seen - {255}) < len(classes)
    res = metric.evaluate(len(ds))
    assert res["mIoU"] == 100.0 and res["aAcc"] == 100.0


# --------------------------------------------------------------------------- data checks


def test_ade_root_resolution(shapes_root):
    from downstream.segmentation import resolve_ade_root

    for src in (shapes_root, shapes_root / "ade20k", shapes_root / ADE):
        assert resolve_ade_root(DataConfig(source=str(src))) == shapes_root / ADE
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_ade_root(DataConfig(source=str(shapes_root / "nope")))


def test_missing_annotation_file(ade_copy):
    from downstream.segmentation import check_ade

    victim = sorted((ade_copy / "annotations" / "validation").glob("*.png"))[1]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"missing annotation files: .*{victim.name}"):
        check_ade(ade_copy, None)
    from downstream.base import get_task

    with pytest.raises(DatasetError, match="missing annotation files"):  # the task's early check
        get_task("segmentation").check_data(_tiny_cfg(), DataConfig(source=str(ade_copy)))


def test_category_mismatches(ade_copy):
    from downstream.segmentation import check_ade

    with pytest.raises(DatasetError, match="category mismatch: the task's classes"):
        check_ade(ade_copy, ["circle", "square"])
    (ade_copy / "classes.json").unlink()  # now the task's classes are taken as they are
    with pytest.raises(DatasetError, match=r"category mismatch: label map .* 2 classes"):
        check_ade(ade_copy, ["circle", "square"])
    (ade_copy / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    with pytest.raises(DatasetError, match="category mismatch: label map"):
        check_ade(ade_copy, None)


@pytest.mark.mm
def test_unreadable_or_out_of_range_label_map_is_named(ade_copy):
    from downstream._mm.mmseg_modules import CheckedLoadSegAnnotations

    ann = sorted((ade_copy / "annotations" / "training").glob("*.png"))[0]
    load = CheckedLoadSegAnnotations(num_classes=8)  # reduce_zero_label from the results

    def results() -> dict:
        return dict(seg_map_path=str(ann), reduce_zero_label=True, seg_fields=[])

    assert load(results())["gt_seg_map"].max() == 255  # background -> ignored
    Image.fromarray(np.full((8, 8), 12, np.uint8)).save(ann)
    with pytest.raises(DatasetError, match=r"labels \[11\] \(after reduce_zero_label"):
        load(results())
    ann.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=f"cannot read label map .*{ann.name}"):
        load(results())


# --------------------------------------------------------------------------- end to end


@pytest.mark.mm
@pytest.mark.slow
def test_segmentation_end_to_end_on_synthetic_ade(shapes_root, tmp_path):
    from mmengine.config import Config

    from downstream.base import TaskContext, get_task
    from pretrain.encoders.vit import ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(**MICRO))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = _tiny_cfg(max_iters=120, lr=2e-3)
    ctx = TaskContext(data=DataConfig(source=str(shapes_root)), seed=0, device=torch.device("cpu"),
                      out_dir=tmp_path / "seg", log=lambda m: None)  # fmt: skip
    task = get_task("segmentation")
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == {"miou"} and 0.0 <= res.metrics["miou"] <= 100.0
    d = res.details
    assert d["iters_run"] == 120 and np.isfinite(d["losses"]).all()
    losses = np.array(d["losses"])
    assert losses[-30:].mean() < losses[:30].mean()
    assert 0 <= d["aacc"] <= 100 and d["classes"] == list(CLASSES)
    mm = Config.fromfile(d["mm_config"])
    assert mm.model.backbone.out_indices == [0, 0, 0, 1]  # depth 2: the BEiT rule, clamped
    assert mm.model.decode_head.type == "UPerHead" and mm.model.auxiliary_head.type == "FCNHead"
    assert mm.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.65
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


@pytest.mark.mm
@pytest.mark.slow
def test_segmentation_through_the_cli(shapes_root, tmp_path, capsys):
    from harness.cli import main

    sets = ["tasks.0.crop_size=64", "tasks.0.decode_channels=16", "tasks.0.aux_channels=8",
            "tasks.0.batch_size=2", "tasks.0.max_iters=4", "tasks.0.log_level=WARNING"]  # fmt: skip
    argv = ["eval", "segmentation", "--encoder", "random:vit_micro_32", "--data", str(shapes_root),
            "--out", str(tmp_path / "runs")] + [a for s in sets for a in ("--set", s)]  # fmt: skip
    assert main(argv) == 0
    records = list((tmp_path / "runs").rglob("records/*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "ok" and 0.0 <= rec["metrics"]["miou"] <= 100.0
    assert rec["task"] == {"name": "segmentation", "version": 1}
    assert any((tmp_path / "runs").rglob("segmentation_config.py"))
