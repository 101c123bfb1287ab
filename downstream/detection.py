"""COCO object detection and instance segmentation: Mask R-CNN on a plain ViT (mmdet).

The protocol of ViTDet (Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection", ECCV 2022), with which MAE (He et al., CVPR 2022, Table 4: ViT-B 50.3 box AP /
44.9 mask AP) reports COCO transfer:

* backbone: our encoder's blocks with window attention (14 x 14 windows at 1024 px for 16 px
  patches) in all but four evenly spaced global blocks, decomposed relative position embeddings
  added at fine-tuning (zero init), absolute position embeddings interpolated, drop path 0.1;
* neck: the simple feature pyramid, strides 4, 8, 16, 32 from the last block's map by two
  deconvolutions, one deconvolution, identity and max pooling, plus 64 by subsampling;
  LayerNorm in the neck and in the 4-conv box head and the mask head; 2-conv RPN head;
* data: large-scale jitter (resize by [0.1, 2.0] of 1024, crop / pad to 1024 x 1024), flip;
  test at 1024 (longer side) padded to a square;
* optimization: AdamW lr 1e-4 at batch 64 (betas 0.9 / 0.999, weight decay 0.1), layer-wise
  lr decay 0.7 (ViT-B), 250 warmup iterations, 184,375 iterations (100 epochs) with the lr
  divided by 10 at 88.9 % and 96.3 %.

Swin encoders (SimMIM's main setting) run as mmdet's own Swin with our weights mapped in (see
:mod:`downstream._mm.swin_dense`) and a standard FPN on the stages (Liu et al., ICCV 2021,
Sec. 4.2); everything else (heads, LSJ, schedule) is the protocol above, as ViTDet (Table 5)
compares plain and hierarchical backbones under one recipe. Layer-wise lr decay runs over all
Swin blocks with ``swin_layer_decay`` (0.9, SimMIM's Swin-B fine-tuning value).

Metrics are mmdet's CocoMetric (pycocotools' COCOeval) on val: ``box_ap`` and ``mask_ap`` on a
0-100 scale (AP at IoU .50:.95), the other COCO numbers in ``details``. The full mm config is
generated from :class:`DetectionConfig` and saved beside the run as ``detection_config.py``.

``python -m downstream._mm.bench detection`` (or ``mimbench bench task/detection``) prints seconds per
iteration and peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from harness.core.config import ConfigError, DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import DatasetError, resolve_shapes_root
from pretrain.encoders.base import Encoder

from ._mm.bench import time_training
from ._mm.runtime import dataloader, optim_config, runtime_config
from .base import PipelineBench, Task, TaskContext, TaskResult, register_task

IMG_MEAN = [123.675, 116.28, 103.53]  # RGB, 0-255 (ImageNet)
IMG_STD = [58.395, 57.12, 57.375]


class DetectionConfig(TaskConfig):
    """Mask R-CNN with ViTDet's backbone adaptations (see :mod:`downstream.detection`); the
    window, global-block and relative-position fields apply to ViT encoders only (a Swin keeps
    its own windows and relative position biases).

    Defaults are ViTDet's ViT-B COCO schedule; the learning rate is ``lr * batch_size /
    lr_base_batch`` (``lr_base_batch: null`` uses ``lr`` as it is).
    """

    name: Literal["detection"] = "detection"
    classes: list[str] | None = None  # None: every category of the annotation file
    img_size: int = Field(1024, ge=32)
    lsj_ratio_range: tuple[float, float] = (0.1, 2.0)
    window_size: int = Field(14, ge=0)
    global_blocks: list[int] | None = None  # None: four evenly spaced (ViT-B: 2, 5, 8, 11)
    rel_pos: bool = True
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    fpn_channels: int = Field(256, ge=8)
    anchor_scale: float = Field(8.0, gt=0)  # anchor side = scale * level stride (32 px at stride 4)
    roi_fc_channels: int = Field(1024, ge=8)
    batch_size: int = Field(64, ge=1)
    val_batch_size: int = Field(1, ge=1)
    max_iters: int = Field(184375, ge=1)
    warmup_iters: int = Field(250, ge=0)
    lr: float = Field(1e-4, gt=0)
    lr_base_batch: int | None = Field(64, ge=1)
    lr_milestones: tuple[float, float] = (0.889, 0.963)  # fractions of max_iters; gamma 0.1
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.7, gt=0, le=1.0)
    swin_layer_decay: float = Field(0.9, gt=0, le=1.0)  # over all blocks of a Swin (SimMIM's 0.9)
    clip_grad: float | None = None
    max_per_img: int = Field(100, ge=1)
    score_thr: float = Field(0.05, ge=0.0, lt=1.0)  # detections kept for evaluation
    amp: Literal["auto", "on", "off"] = "auto"  # auto: on with CUDA
    val_interval: int | None = Field(None, ge=1)  # None: evaluate at the end only
    checkpoint_interval: int = Field(5000, ge=1)
    log_interval: int = Field(50, ge=1)
    log_level: Literal["INFO", "WARNING"] = "INFO"


# --------------------------------------------------------------------------- data


def resolve_coco_root(data: DataConfig) -> Path:
    """The COCO root (``annotations/``, ``train2017/``, ``val2017/``) that ``data`` names.

    ``source: shapes`` generates the synthetic scenes; a path may be a COCO root or a directory
    holding ``coco/`` (the output of ``mimbench data synth``).
    """
    if data.source == "shapes":
        return resolve_shapes_root(data) / "coco"
    root = Path(data.source).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset path {root} does not exist: set data.source to a COCO root holding "
            "annotations/instances_{train,val}2017.json, train2017/ and val2017/, or to 'shapes'"
        )
    if not (root / "annotations").is_dir() and (root / "coco" / "annotations").is_dir():
        root = root / "coco"
    return root


def _read_coco(ann: Path) -> dict[str, Any]:
    if not ann.is_file():
        raise DatasetError(
            f"COCO annotation file {ann} is missing: a COCO root holds "
            "annotations/instances_train2017.json and annotations/instances_val2017.json"
        )
    try:
        obj = json.loads(ann.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read COCO annotation file {ann}: {exc}") from None
    if not isinstance(obj, dict) or not {"images", "annotations", "categories"} <= set(obj):
        raise DatasetError(
            f"{ann} is not a COCO instances file (needs images, annotations, categories)"
        )
    return obj


def check_coco(root: Path, classes: list[str] | None) -> list[str]:
    """Check a COCO root; return the classes to train on, in the file's category-id order.

    Raises:
        DatasetError: A missing annotation file or image folder, categories that differ between
            train and val, annotations of undeclared categories, or ``classes`` naming a
            category the files lack.
    """
    cats: dict[str, list[tuple[int, str]]] = {}
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}2017.json"
        obj = _read_coco(ann)
        if not (root / f"{split}2017").is_dir():
            raise DatasetError(
                f"image folder {root / f'{split}2017'} is missing (beside {ann.parent})"
            )
        if not obj["images"] or not obj["annotations"]:
            raise DatasetError(f"{ann} lists no {'images' if not obj['images'] else 'annotations'}")
        cats[split] = sorted((int(c["id"]), str(c["name"])) for c in obj["categories"])
        ids = {i for i, _ in cats[split]}
        stray = sorted({a["category_id"] for a in obj["annotations"]} - ids)
        if stray:
            raise DatasetError(
                f"category mismatch in {ann}: annotations use category ids {stray[:10]} that "
                "its 'categories' list does not declare"
            )
    if cats["train"] != cats["val"]:
        diff = sorted(set(cats["train"]) ^ set(cats["val"]))[:10]
        raise DatasetError(
            f"category mismatch: train and val annotation files of {root} declare different "
            f"categories (differing (id, name): {diff})"
        )
    names = [n for _, n in cats["train"]]
    if classes is None:
        return names
    missing = [c for c in classes if c not in names]
    if missing:
        raise DatasetError(
            f"category mismatch: classes {missing} of the task config are not categories of "
            f"{root / 'annotations'} (it has: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})"
        )
    return [n for n in names if n in classes]


# --------------------------------------------------------------------------- mm config


def _backbone_and_neck(
    cfg: DetectionConfig, encoder: EncoderConfig, init_checkpoint: str | None, scales: list[int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """ViT: ViTDet's windowed backbone and simple feature pyramid. Swin: mmdet's Swin (our
    weights mapped in) with a standard FPN on its stages, the extra levels up to stride 64 by
    max pooling (Swin's Mask R-CNN). SwinV2: our SwinV2 itself (:mod:`downstream._mm.swinv2_dense`,
    mmdet has none) under the same FPN."""
    if encoder.family == "swinv2":
        from ._mm.swinv2_dense import swinv2_stage_channels

        chans = swinv2_stage_channels(encoder)
        if [encoder.patch_size * 2**i for i in range(len(chans))] != scales[: len(chans)]:
            raise ConfigError(f"SwinV2 encoder '{encoder.arch}' has patch size {encoder.patch_size}; "
                              "detection needs stage strides 4, 8, 16, ... (patch size 4)")  # fmt: skip
        backbone = dict(type="MimSwinV2", encoder=encoder.model_dump(mode="json"),
                        img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate,
                        init_checkpoint=init_checkpoint)  # fmt: skip
        neck = dict(type="FPN", in_channels=chans, out_channels=cfg.fpn_channels,
                    num_outs=len(scales) + 1)  # fmt: skip
        return backbone, neck
    if encoder.family == "swin":
        from ._mm.swin_dense import mm_swin_kwargs, swin_stage_channels

        swin = mm_swin_kwargs(encoder, cfg.drop_path_rate)
        n = len(swin["depths"])
        if [swin["patch_size"] * 2**i for i in range(n)] != scales[:n]:
            raise ConfigError(f"Swin encoder '{encoder.arch}' has patch size {swin['patch_size']}; "
                              "detection needs stage strides 4, 8, 16, ... (patch size 4)")  # fmt: skip
        backbone = dict(type="MimSwin", **swin, init_checkpoint=init_checkpoint)
        neck = dict(type="FPN", in_channels=swin_stage_channels(encoder), out_channels=cfg.fpn_channels,
                    num_outs=len(scales) + 1)  # fmt: skip
        return backbone, neck
    backbone = dict(
        type="MimViTDetBackbone", encoder=encoder.model_dump(mode="json"), out_indices=[-1],
        img_size=cfg.img_size, window_size=cfg.window_size, global_blocks=cfg.global_blocks,
        rel_pos=cfg.rel_pos, drop_path_rate=cfg.drop_path_rate, init_checkpoint=init_checkpoint,
    )  # fmt: skip
    neck = dict(type="MimSimpleFPN", in_dim=encoder.embed_dim, patch_size=encoder.patch_size,
                out_channels=cfg.fpn_channels, strides=scales, extra_pool=True)  # fmt: skip
    return backbone, neck


def build_mm_config(
    cfg: DetectionConfig,
    encoder: EncoderConfig,
    root: Path,
    classes: list[str],
    init_checkpoint: str | None,
    work_dir: str,
    experiment_name: str,
    seed: int = 0,
    num_workers: int = 0,
    amp: bool = False,
    with_val: bool = True,
    save_checkpoints: bool = True,
) -> dict[str, Any]:
    """The full mmdet config of a run (plain dicts; see the module docstring for the protocol)."""
    s, c, k = cfg.img_size, cfg.fpn_channels, len(classes)
    norm = dict(type="MimLN2d", requires_grad=True)
    scales = [4, 8, 16, 32]
    backbone, neck = _backbone_and_neck(cfg, encoder, init_checkpoint, scales)
    bbox_coder = dict(
        type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]
    )
    model = dict(
        type="MaskRCNN",
        data_preprocessor=dict(
            type="DetDataPreprocessor", mean=IMG_MEAN, std=IMG_STD, bgr_to_rgb=True,
            pad_mask=True, pad_size_divisor=32,
            batch_augments=[dict(type="BatchFixedSizePad", size=(s, s), pad_mask=True)],
        ),
        backbone=backbone,
        neck=neck,
        rpn_head=dict(
            type="RPNHead", in_channels=c, feat_channels=c, num_convs=2,
            anchor_generator=dict(type="AnchorGenerator", scales=[cfg.anchor_scale], ratios=[0.5, 1.0, 2.0],
                                  strides=scales + [64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(type="SingleRoIExtractor", out_channels=c, featmap_strides=scales,
                                    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0)),
            bbox_head=dict(
                type="Shared4Conv1FCBBoxHead", in_channels=c, conv_out_channels=c,
                fc_out_channels=cfg.roi_fc_channels, roi_feat_size=7, num_classes=k, norm_cfg=norm,
                bbox_coder=bbox_coder, reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            ),
            mask_roi_extractor=dict(type="SingleRoIExtractor", out_channels=c, featmap_strides=scales,
                                    roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0)),
            mask_head=dict(
                type="FCNMaskHead", num_convs=4, in_channels=c, conv_out_channels=c,
                num_classes=k, norm_cfg=norm,
                loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0),
            ),
        ),
        train_cfg=dict(
            rpn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3,
                              min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                             add_gt_as_proposals=False),
                allowed_border=-1, pos_weight=-1, debug=False,
            ),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5,
                              min_pos_iou=0.5, match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                             add_gt_as_proposals=True),
                mask_size=28, pos_weight=-1, debug=False,
            ),
        ),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=dict(score_thr=cfg.score_thr, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=cfg.max_per_img, mask_thr_binary=0.5),
        ),
    )  # fmt: skip
    load_img = dict(type="MimLoadImageFromFile")
    train_pipeline = [
        load_img,
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomResize", scale=(s, s), ratio_range=tuple(cfg.lsj_ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_type="absolute_range", crop_size=(s, s), recompute_bbox=True,
             allow_negative_crop=True),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]  # fmt: skip
    test_pipeline = [
        load_img,
        dict(type="Resize", scale=(s, s), keep_ratio=True),
        # square padding with the mean color (0 after normalization), as training's batch pad
        dict(type="Pad", size=(s, s), pad_val=dict(img=tuple(IMG_MEAN[::-1]))),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]  # fmt: skip
    metainfo = dict(classes=tuple(classes))

    def dataset(split: str, pipeline: list[Any], test: bool) -> dict[str, Any]:
        return dict(
            type="CocoDataset", data_root=str(root), metainfo=metainfo,
            ann_file=f"annotations/instances_{split}2017.json", data_prefix=dict(img=f"{split}2017/"),
            filter_cfg=None if test else dict(filter_empty_gt=True, min_size=32),
            test_mode=test, pipeline=pipeline,
        )  # fmt: skip

    warmup = min(cfg.warmup_iters, cfg.max_iters)
    lr = cfg.lr * (cfg.batch_size / cfg.lr_base_batch if cfg.lr_base_batch else 1.0)
    layer_decay = cfg.swin_layer_decay if encoder.is_hierarchical else cfg.layer_decay
    out = runtime_config(
        scope="mmdet", module="downstream._mm.mmdet_modules", work_dir=work_dir,
        experiment_name=experiment_name, seed=seed, max_iters=cfg.max_iters,
        val_interval=cfg.val_interval, checkpoint_interval=cfg.checkpoint_interval,
        log_interval=cfg.log_interval, log_level=cfg.log_level,
    )  # fmt: skip
    out.update(
        model=model,
        train_dataloader=dataloader(dataset("train", train_pipeline, False), cfg.batch_size, num_workers, True),
        optim_wrapper=optim_config(lr=lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                   layer_decay=layer_decay, amp=amp, clip_grad=cfg.clip_grad),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=max(warmup, 1)),
            dict(type="MultiStepLR", by_epoch=False, begin=0, end=cfg.max_iters, gamma=0.1,
                 milestones=[max(1, int(round(f * cfg.max_iters))) for f in cfg.lr_milestones]),
        ],
    )  # fmt: skip
    if with_val:
        out.update(
            val_dataloader=dataloader(dataset("val", test_pipeline, True), cfg.val_batch_size, num_workers, False),
            val_cfg=dict(type="ValLoop"),
            val_evaluator=dict(type="CocoMetric", metric=["bbox", "segm"], format_only=False,
                               ann_file=str(root / "annotations" / "instances_val2017.json")),
        )  # fmt: skip
    if not save_checkpoints:
        out["default_hooks"]["checkpoint"] = None
    return out


# --------------------------------------------------------------------------- task

COCO_KEYS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def coco_metrics(raw: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    """mmdet's CocoMetric output (``coco/bbox_mAP`` in [0, 1]) -> task metrics and details on a
    0-100 scale. No detection at all gives AP 0 (COCOeval is not run then); COCOeval's -1 (no
    ground truth in an area range) becomes None."""
    details: dict[str, float | None] = {}
    for kind in ("bbox", "segm"):
        for key in COCO_KEYS:
            v = raw.get(f"coco/{kind}_{key}")
            if v is not None:
                details[f"{kind}_{key}"] = 100.0 * float(v) if float(v) >= 0 else None
    metrics = {
        "box_ap": details.get("bbox_mAP") or 0.0,
        "mask_ap": details.get("segm_mAP") or 0.0,
    }
    return metrics, details


@register_task("detection")
class Detection(Task):
    """COCO Mask R-CNN with a ViTDet backbone (see the module docstring)."""

    name = "detection"
    version = 1
    metrics = {"box_ap": True, "mask_ap": True}
    config_cls = DetectionConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """Fail early (before any training) on a dataset this task cannot read."""
        assert isinstance(cfg, DetectionConfig)
        check_coco(resolve_coco_root(data), cfg.classes)

    def bench_pipeline(self, arch: str, iters: int, count_flops: bool, batch_size: int | None = None,
                       size: int | None = None, threads: int | None = None) -> PipelineBench:
        """mmengine training iterations on synthetic COCO scenes (batch 1, LSJ size 1024 by default) (:func:`downstream._mm.bench.time_training`)."""
        batch = batch_size or 1

        def build(data: Path, mm_kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            from ._mm import mmdet_modules  # noqa: F401  (registers our modules with mmdet)

            cfg = DetectionConfig(img_size=size or 1024, batch_size=batch, max_iters=iters,
                                  log_level="WARNING", log_interval=1)
            coco = data / "coco"
            mm = build_mm_config(cfg, root=coco, classes=check_coco(coco, None), **mm_kwargs)
            return mm, f"{cfg.img_size}x{cfg.img_size}"

        return time_training(self.name, arch, iters, batch, threads, count_flops, build)

    def run(self, encoder: Encoder, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, DetectionConfig)
        from ._mm import dense

        dense.dense_family(encoder, "detection")
        root = resolve_coco_root(ctx.data)
        classes = check_coco(root, cfg.classes)
        res = dense.run_dense_task(
            "detection", encoder, ctx,
            lambda init, work_dir, exp, amp: build_mm_config(
                cfg, encoder.cfg, root, classes, init, work_dir, exp, seed=ctx.seed,
                num_workers=ctx.data.num_workers, amp=amp),
            module="downstream._mm.mmdet_modules", amp=cfg.amp,
        )  # fmt: skip
        metrics, details = coco_metrics(res.metrics)
        ctx.log(f"[detection] box AP {metrics['box_ap']:.1f}  mask AP {metrics['mask_ap']:.1f}  "
                f"({res.seconds_per_iter():.2f} s/iter, {res.wall_seconds:.0f} s)")  # fmt: skip
        return TaskResult(metrics=metrics, details={
            "coco": details, "classes": classes, "data_root": str(root),
            "empty_predictions": "coco/bbox_mAP" not in res.metrics, **dense.run_details(res),
        })  # fmt: skip
