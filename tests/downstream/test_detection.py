"""COCO detection (mmdet Mask R-CNN on a ViTDet backbone): backbone pieces, layer-wise lr
decay, COCO evaluation of a perfect prediction, data checks, end to end on synthetic scenes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from downstream._mm.vit_dense import (
    DenseViT,
    SimpleFeaturePyramid,
    default_global_blocks,
    window_partition,
    window_unpartition,
)
from harness.core.config import DataConfig, EncoderConfig
from harness.core.data.datasets import DatasetError
from harness.core.data.shapes import CLASSES, ShapesSpec, ensure_shapes

MICRO = {"arch": "vit_micro_32"}  # patch 8, width 32, depth 2, 2 heads
SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=96,
                  train_scenes=16, val_scenes=4, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic scenes in the COCO and ADE20K layouts (generated once per session)."""
    return ensure_shapes(SPEC, cache_root=tmp_path_factory.getbasetemp() / "shapes-cache")


@pytest.fixture
def coco_copy(shapes_root: Path, tmp_path: Path) -> Path:
    """A private copy of the COCO layout that a test may break."""
    return Path(shutil.copytree(shapes_root / "coco", tmp_path / "coco"))


# --------------------------------------------------------------------------- backbone (torch only)


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 7, 10, 5)  # [B, H, W, C], neither side a multiple of 4
    w, padded = window_partition(x, 4)
    assert padded == (8, 12) and w.shape == (2 * 2 * 3, 4, 4, 5)
    assert torch.equal(window_unpartition(w, 4, padded, (7, 10)), x)
    assert torch.equal(w[0], x[0, :4, :4])  # first window: the top-left corner


def test_one_window_covering_the_grid_equals_global_attention():
    torch.manual_seed(0)
    windowed = DenseViT(MICRO, img_size=64, window_size=8, global_blocks=[])  # 8x8 grid
    glob = DenseViT(MICRO, img_size=64, window_size=0)
    glob.load_state_dict(windowed.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(windowed(x)[0], glob(x)[0], atol=1e-6)
    small = DenseViT(MICRO, img_size=64, window_size=2, global_blocks=[])
    small.load_state_dict(windowed.state_dict())
    assert not torch.allclose(small(x)[0], glob(x)[0], atol=1e-4)  # windows do restrict


def test_dense_vit_runs_the_timm_blocks_on_patch_tokens():
    torch.manual_seed(0)
    m = DenseViT(MICRO, out_indices=[0, 1], img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    vit = m.encoder.vit
    t = vit.patch_embed(x) + vit.pos_embed[:, 1:]  # [B, L, D], the class token dropped
    ref = []
    for blk in vit.blocks:
        t = blk(t)
        ref.append(t.transpose(1, 2).reshape(2, 32, 4, 4))
    out = m(x)
    assert len(out) == 2 and all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref, strict=True)
    )


def test_relative_positions_start_at_zero_and_learn():
    torch.manual_seed(0)
    with_rel = DenseViT(MICRO, img_size=64, window_size=4, global_blocks=[1], rel_pos=True)
    plain = DenseViT(MICRO, img_size=64, window_size=4, global_blocks=[1])
    plain.load_state_dict(with_rel.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 80)  # not the training size: tables and position embedding resize
    y = with_rel(x)[0]
    assert y.shape == (1, 32, 8, 10)
    assert torch.allclose(y, plain(x)[0], atol=1e-5)  # zero tables change nothing
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in with_rel.rel_pos.parameters())
    assert with_rel.rel_pos[0].rel_pos_h.shape[0] == 2 * 4 - 1  # windowed block: window size
    assert with_rel.rel_pos[1].rel_pos_h.shape[0] == 2 * 8 - 1  # global block: 64 / 8


def test_vitdet_defaults_and_feature_pyramid_strides():
    assert default_global_blocks(12) == [2, 5, 8, 11]  # ViTDet ViT-B
    assert default_global_blocks(24) == [5, 11, 17, 23]  # ViTDet ViT-L
    for patch, dim in ((16, 64), (8, 32)):
        fpn = SimpleFeaturePyramid(dim, patch, out_channels=16)
        feats = fpn([torch.randn(1, dim, 128 // patch, 128 // patch)])
        assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]  # strides 4, 8, 16, 32, 64
        assert all(f.shape[1] == 16 for f in feats)


def test_layer_ids_for_lr_decay():
    m = DenseViT(MICRO, img_size=64, window_size=4, rel_pos=True)
    assert m.layer_id("encoder.vit.patch_embed.proj.weight") == 0
    assert m.layer_id("encoder.vit.pos_embed") == 0
    assert m.layer_id("encoder.vit.blocks.1.mlp.fc1.weight") == 2
    assert m.layer_id("rel_pos.0.rel_pos_h") == 1
    assert not m.encoder.vit.cls_token.requires_grad  # dropped, so frozen
    assert m.encoder.vit.pos_embed.requires_grad  # fine-tuned


# --------------------------------------------------------------------------- mm pieces


@pytest.mark.mm
def test_layer_decay_constructor_groups():
    from downstream._mm.common import LayerDecayOptimWrapperConstructor

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = DenseViT(MICRO, img_size=64)
            self.head = torch.nn.Linear(32, 3)

    model = Model()
    ctor = LayerDecayOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.1)),
        paramwise_cfg=dict(layer_decay_rate=0.5),
    )
    groups = ctor(model).optimizer.param_groups
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def lr_wd(name: str) -> tuple[float, float]:
        g = where[id(named[name])]
        return g["lr"], g["weight_decay"]

    assert lr_wd("backbone.encoder.vit.patch_embed.proj.weight") == (0.5**3, 0.1)  # depth 2: 0..3
    assert lr_wd("backbone.encoder.vit.pos_embed") == (0.5**3, 0.0)
    assert lr_wd("backbone.encoder.vit.blocks.0.attn.qkv.weight") == (0.5**2, 0.1)
    assert lr_wd("backbone.encoder.vit.blocks.1.attn.qkv.bias") == (0.5, 0.0)
    assert lr_wd("backbone.encoder.vit.blocks.1.norm1.weight") == (0.5, 0.0)
    assert lr_wd("head.weight") == (1.0, 0.1)
    assert id(named["backbone.encoder.vit.cls_token"]) not in where  # frozen: no group
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_trainable


def _perfect_coco_predictions(ann_file: Path) -> list[dict]:
    from pycocotools.coco import COCO

    coco = COCO(str(ann_file))
    cat_ids = sorted(coco.getCatIds())
    samples = []
    for img in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in anns]  # fmt: skip
        samples.append(dict(
            img_id=img["id"], ori_shape=(img["height"], img["width"]),
            pred_instances=dict(
                bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                scores=torch.ones(len(anns)),
                labels=torch.tensor([cat_ids.index(a["category_id"]) for a in anns], dtype=torch.long),
                masks=torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]).astype(bool)),
            ),
        ))  # fmt: skip
    return samples


def _coco_eval(ann_file: Path, samples: list[dict]) -> dict:
    from mmdet.evaluation import CocoMetric

    metric = CocoMetric(ann_file=str(ann_file), metric=["bbox", "segm"])
    metric.dataset_meta = dict(classes=CLASSES)
    for s in samples:
        metric.process({}, [s])
    return metric.evaluate(len(samples))


@pytest.mark.mm
def test_perfect_prediction_scores_ap_100_through_coco_metric(shapes_root):
    from downstream.detection import coco_metrics

    ann = shapes_root / "coco" / "annotations" / "instances_val2017.json"
    samples = _perfect_coco_predictions(ann)
    assert sum(len(s["pred_instances"]["labels"]) for s in samples) > 0
    raw = _coco_eval(ann, samples)
    assert raw["coco/bbox_mAP"] == 1.0 and raw["coco/segm_mAP"] == 1.0
    metrics, details = coco_metrics(raw)
    assert metrics == {"box_ap": 100.0, "mask_ap": 100.0}
    assert details["bbox_mAP_50"] == 100.0
    # the same boxes with wrong labels score nothing; half-size boxes score below perfect
    for s in samples:
        s["pred_instances"]["labels"] = (s["pred_instances"]["labels"] + 1) % len(CLASSES)
    assert _coco_eval(ann, samples)["coco/bbox_mAP"] == 0.0
    samples = _perfect_coco_predictions(ann)
    for s in samples:
        b = s["pred_instances"]["bboxes"]
        b[:, 2:] = (b[:, :2] + b[:, 2:]) / 2
    assert _coco_eval(ann, samples)["coco/bbox_mAP"] < 0.5


@pytest.mark.mm
def test_unreadable_image_is_named(tmp_path):
    from downstream._mm.common import CheckedLoadImageFromFile

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"image .*broken\.jpg"):
        CheckedLoadImageFromFile()(dict(img_path=str(bad)))
    with pytest.raises(DatasetError, match="missing.jpg"):
        CheckedLoadImageFromFile()(dict(img_path=str(tmp_path / "missing.jpg")))


# --------------------------------------------------------------------------- data checks


def test_coco_check_passes_and_orders_classes(shapes_root):
    from downstream.detection import check_coco, resolve_coco_root

    root = resolve_coco_root(DataConfig(source=str(shapes_root)))  # the synth root holds coco/
    assert root == shapes_root / "coco"
    assert check_coco(root, None) == list(CLASSES)
    assert check_coco(root, ["star", "circle"]) == ["circle", "star"]  # file's id order


def test_missing_annotation_file(coco_copy):
    from downstream.detection import check_coco

    (coco_copy / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match=r"instances_val2017\.json is missing"):
        check_coco(coco_copy, None)
    from downstream.base import get_task
    from downstream.detection import DetectionConfig

    with pytest.raises(DatasetError, match="is missing"):  # the task's early check
        get_task("detection").check_data(DetectionConfig(), DataConfig(source=str(coco_copy)))


def test_category_mismatches(coco_copy):
    from downstream.detection import check_coco

    with pytest.raises(DatasetError, match=r"category mismatch: classes \['person'\]"):
        check_coco(coco_copy, ["circle", "person"])
    ann = coco_copy / "annotations" / "instances_val2017.json"
    obj = json.loads(ann.read_text())
    obj["categories"][0]["name"] = "disc"
    ann.write_text(json.dumps(obj))
    with pytest.raises(
        DatasetError, match="train and val annotation files .* different categories"
    ):
        check_coco(coco_copy, None)
    obj["categories"] = obj["categories"][1:]
    ann.write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match="category mismatch .* ids"):
        check_coco(coco_copy, None)


def test_importing_harness_and_tasks_does_not_import_mm():
    code = ("import sys, harness, harness.cli, downstream.base as b; b.all_tasks(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('mmcv', 'mmdet', 'mmseg', 'mmengine')]; "
            "assert not bad, bad; assert {'detection', 'segmentation'} <= set(b.all_tasks())")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --------------------------------------------------------------------------- end to end


@pytest.mark.mm
@pytest.mark.slow
def test_detection_end_to_end_on_synthetic_coco(shapes_root, tmp_path):
    from mmengine.config import Config

    from downstream.base import TaskContext, get_task
    from downstream.detection import DetectionConfig
    from pretrain.encoders.vit import ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(**MICRO))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    # 64 px (an 8 x 8 token grid, four 4 x 4 windows), 12 iterations and at most 20 detections
    # per image (pasting 100 full-image masks per val image dominated the evaluation)
    cfg = DetectionConfig(
        img_size=64, window_size=4, global_blocks=[1], fpn_channels=32, roi_fc_channels=64,
        batch_size=2, max_iters=12, warmup_iters=2, lr=1e-3, lr_base_batch=None, score_thr=0.0,
        max_per_img=20, checkpoint_interval=1000, log_level="WARNING",
    )  # fmt: skip
    ctx = TaskContext(data=DataConfig(source=str(shapes_root)), seed=0, device=torch.device("cpu"),
                      out_dir=tmp_path / "det", log=lambda m: None)  # fmt: skip
    task = get_task("detection")
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(task.metrics)
    assert all(0.0 <= v <= 100.0 for v in res.metrics.values())
    assert not res.details["empty_predictions"]  # score_thr 0: COCOeval ran on real detections
    d = res.details
    assert d["iters_run"] == 12 and np.isfinite(d["losses"]).all()
    assert d["loss_mean_last"] < d["loss_mean_first"]  # means of the first / last 4 iterations
    mm = Config.fromfile(d["mm_config"])  # the saved config loads back (custom_imports included)
    assert mm.model.backbone.type == "MimViTDetBackbone" and mm.train_cfg.max_iters == 12
    assert mm.model.test_cfg.rcnn.max_per_img == 20
    assert mm.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.7
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    # a second run of the same config resumes from the checkpoint (weights-only loading of
    # mmengine's own checkpoint) and only evaluates
    again = task.run(enc, cfg, ctx)
    assert again.details["iters_run"] == 0
    assert again.metrics == pytest.approx(res.metrics, abs=0.11)


@pytest.mark.mm
def test_generated_model_loads_the_encoder_weights(shapes_root, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import downstream._mm.mmdet_modules  # noqa: F401
    from downstream.detection import DetectionConfig, build_mm_config
    from pretrain.encoders.vit import ViTEncoder

    init_default_scope("mmdet")
    torch.manual_seed(1)
    enc = ViTEncoder(EncoderConfig(**MICRO))
    enc.save_timm(tmp_path / "enc.pth")
    cfg = DetectionConfig(img_size=64, window_size=4, fpn_channels=16, roi_fc_channels=32)
    mm = build_mm_config(cfg, enc.cfg, shapes_root / "coco", list(CLASSES), str(tmp_path / "enc.pth"),
                         str(tmp_path / "work"), "t")  # fmt: skip
    model = MODELS.build(Config(mm).model)  # mmdet reads train_cfg.rpn etc. as attributes
    model.init_weights()  # what mmengine's Runner does before training
    got = model.backbone.encoder.vit.state_dict()
    assert all(torch.equal(got[k], v) for k, v in enc.vit.state_dict().items())
    assert model.roi_head.bbox_head.fc_cls.out_features == len(CLASSES) + 1  # + background


@pytest.mark.mm
def test_openmmlab_log_goes_to_the_work_dir_not_the_console(shapes_root, tmp_path, capfd, monkeypatch):
    """At the default log level (INFO) mmengine logs its full config (hundreds of lines) and
    every logged iteration: by default that goes to its log file in the stage's work directory
    only, the console keeps warnings; MIMBENCH_MM_VERBOSE=1 prints it on the console again."""
    from downstream.base import TaskContext, get_task
    from downstream.detection import DetectionConfig
    from pretrain.encoders.vit import ViTEncoder

    monkeypatch.delenv("MIMBENCH_MM_VERBOSE", raising=False)
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(**MICRO))
    cfg = DetectionConfig(
        img_size=64, window_size=4, global_blocks=[1], fpn_channels=16, roi_fc_channels=32,
        batch_size=2, max_iters=2, warmup_iters=1, lr=1e-3, lr_base_batch=None, max_per_img=5,
        checkpoint_interval=1000, log_interval=1,
    )  # fmt: skip
    assert cfg.log_level == "INFO"  # the default
    ctx = TaskContext(data=DataConfig(source=str(shapes_root)), seed=0, device=torch.device("cpu"),
                      out_dir=tmp_path / "det", log=lambda m: None)  # fmt: skip
    task = get_task("detection")
    capfd.readouterr()
    res = task.run(enc, cfg, ctx)
    out = capfd.readouterr()
    console = out.out + out.err
    logs = sorted(Path(res.details["work_dir"]).glob("*/*.log"))
    assert len(logs) == 1 and logs[0].is_relative_to(tmp_path / "det")
    text = logs[0].read_text()
    assert "model = dict(" in text and "Iter(train) [2/2]" in text  # the full log is kept
    assert "model = dict(" not in console and "Iter(train)" not in console
    assert " - mmengine - INFO - " not in console and " - mmengine - INFO - " in text
    # measured: 57 console lines (pycocotools' own prints, two mmengine warnings), 822 logged
    assert len(console.splitlines()) < 100 < len(text.splitlines())
    monkeypatch.setenv("MIMBENCH_MM_VERBOSE", "1")
    task.run(enc, cfg, ctx)  # resumes: builds the runner (logging its config) and evaluates
    assert "model = dict(" in capfd.readouterr().out
