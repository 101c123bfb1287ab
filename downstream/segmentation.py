"""ADE20K semantic segmentation: UperNet on multi-level ViT features (mmsegmentation).

The protocol of BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022)
that MAE (He et al., CVPR 2022, Table 5: ViT-B 48.1 mIoU) follows:

* backbone: our encoder with global attention, absolute position embeddings interpolated to
  the crop's grid, relative position embeddings turned on for transfer only (zero init; MAE
  A.4; we use the decomposed form of ViTDet), drop path 0.1;
* neck: the outputs of four blocks (ViT-B: blocks 4, 6, 8, 12) turned into strides 4, 8, 16, 32
  by two deconvolutions (BatchNorm + GELU between), one deconvolution, identity and max pooling;
* heads: UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018)
  with pyramid pooling (1, 2, 3, 6) and 768 channels, plus an auxiliary FCN head on the third
  level (loss weight 0.4); BatchNorm in the heads (SyncBN across GPUs in the papers; a single
  process here, where the two are the same);
* data: ``reduce_zero_label`` (label 0 is ignored, 1..K become 0..K-1), random resize of
  (2048, 512) by [0.5, 2.0], 512 x 512 crops with at most 75 % of one class, flip, photometric
  distortion; test at (2048, 512) with sliding 512 windows at stride 341;
* optimization: AdamW lr 1e-4 at batch 16 (betas 0.9 / 0.999, weight decay 0.05), layer-wise lr
  decay 0.65, 1,500 linear warmup iterations, then poly (power 1) decay to 160,000 iterations.

Swin encoders run as mmseg's own Swin with our weights mapped in (see
:mod:`downstream._mm.swin_dense`), UperNet directly on its four stages and the auxiliary head on
the third (Liu et al., ICCV 2021, Sec. 4.3); the rest is the protocol above, with layer-wise lr
decay over all Swin blocks by ``swin_layer_decay`` (0.9, SimMIM's Swin-B fine-tuning value).

The metric is mmseg's IoUMetric on val: ``miou`` (0-100, mean over classes present in the
ground truth or the predictions); pixel accuracy and mean class accuracy go to ``details``.
The full mm config is generated from :class:`SegmentationConfig` and saved beside the run as
``segmentation_config.py``.

``python -m downstream._mm.bench segmentation`` (or ``mimbench bench task/segmentation``) prints seconds per
iteration and peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from harness.core.config import ConfigError, DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import DatasetError, resolve_shapes_root
from pretrain.encoders.base import Encoder

from ._mm.bench import time_training
from ._mm.runtime import dataloader, optim_config, runtime_config
from .base import PipelineBench, Task, TaskContext, TaskResult, register_task
from .detection import IMG_MEAN, IMG_STD

ADE_SPLITS = {"train": "training", "val": "validation"}
IGNORE_INDEX = 255


class SegmentationConfig(TaskConfig):
    """UperNet + auxiliary FCN head on four ViT blocks or on a Swin's stages (see
    :mod:`downstream.segmentation`); ``out_indices`` and ``rel_pos`` apply to ViT encoders only.

    Defaults are BEiT's / MAE's ViT-B ADE20K schedule; the learning rate is ``lr * batch_size /
    lr_base_batch`` (``lr_base_batch: null`` uses ``lr`` as it is).
    """

    name: Literal["segmentation"] = "segmentation"
    classes: list[str] | None = None  # None: classes.json beside the data, else ADE20K's 150
    crop_size: int = Field(512, ge=16)
    resize_scale: tuple[int, int] | None = None  # None: (4 * crop_size, crop_size)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = Field(0.75, gt=0, le=1.0)
    photometric: bool = True
    out_indices: list[int] | None = None  # None: ViT-B 3, 5, 7, 11 (blocks 4, 6, 8, 12)
    rel_pos: bool = True
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    decode_channels: int = Field(768, ge=8)
    aux_channels: int = Field(256, ge=8)
    aux_loss_weight: float = Field(0.4, ge=0)
    batch_size: int = Field(16, ge=2)  # >= 2: BatchNorm after UperNet's 1x1 pooling branch
    max_iters: int = Field(160000, ge=1)
    warmup_iters: int = Field(1500, ge=0)
    lr: float = Field(1e-4, gt=0)
    lr_base_batch: int | None = Field(16, ge=1)
    poly_power: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = Field(0.65, gt=0, le=1.0)
    swin_layer_decay: float = Field(0.9, gt=0, le=1.0)  # over all blocks of a Swin (SimMIM's 0.9)
    clip_grad: float | None = None
    test_mode: Literal["slide", "whole"] = "slide"
    test_stride: int | None = Field(None, ge=1)  # None: 2/3 of the crop (341 at 512)
    amp: Literal["auto", "on", "off"] = "auto"  # auto: on with CUDA
    val_interval: int | None = Field(None, ge=1)  # None: evaluate at the end only
    checkpoint_interval: int = Field(16000, ge=1)
    log_interval: int = Field(50, ge=1)
    log_level: Literal["INFO", "WARNING"] = "INFO"


# --------------------------------------------------------------------------- data


def resolve_ade_root(data: DataConfig) -> Path:
    """The ADE20K root (``images/`` and ``annotations/``, each with ``training/`` and
    ``validation/``) that ``data`` names: ``shapes``, the root itself, its parent, or the
    output of ``mimbench data synth`` (``ade20k/ADEChallengeData2016``)."""
    if data.source == "shapes":
        return resolve_shapes_root(data) / "ade20k" / "ADEChallengeData2016"
    root = Path(data.source).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset path {root} does not exist: set data.source to an ADE20K root "
            "(ADEChallengeData2016 holding images/ and annotations/), or to 'shapes'"
        )
    for cand in (root, root / "ADEChallengeData2016", root / "ade20k" / "ADEChallengeData2016"):
        if (cand / "images").is_dir() or (cand / "annotations").is_dir():
            return cand
    return root


def check_ade(root: Path, classes: list[str] | None, sample: int = 16) -> list[str]:
    """Check an ADE20K-layout root; return the class names.

    Classes: ``classes`` if given, else ``classes.json`` in the root, else ADE20K's 150. A
    sample of label maps per split is read to catch labels beyond the classes early (every map
    is checked again when it is loaded).

    Raises:
        DatasetError: A missing folder, images without a label map, classes that disagree with
            ``classes.json``, unreadable label maps or labels outside the classes.
    """
    stems: dict[str, list[str]] = {}
    for split in ADE_SPLITS.values():
        img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        for d, what in ((img_dir, "image"), (ann_dir, "annotation")):
            if not d.is_dir():
                raise DatasetError(
                    f"{what} folder {d} is missing: an ADE20K root holds images/{{training,validation}}/*.jpg "
                    "and annotations/{training,validation}/*.png"
                )
        imgs = sorted(p.stem for p in img_dir.glob("*.jpg"))
        anns = {p.stem for p in ann_dir.glob("*.png")}
        if not imgs:
            raise DatasetError(f"{img_dir} holds no .jpg images")
        missing = [s for s in imgs if s not in anns]
        if missing:
            raise DatasetError(
                f"missing annotation files: {len(missing)} image(s) of {img_dir} have no label map in "
                f"{ann_dir} (e.g. {', '.join(m + '.png' for m in missing[:3])})"
            )
        stems[split] = imgs
    names = _resolve_classes(root, classes)
    for split, imgs in stems.items():
        for stem in imgs[:: max(1, len(imgs) // sample)][:sample]:
            path = root / "annotations" / split / f"{stem}.png"
            try:
                labels = np.unique(np.asarray(Image.open(path)))
            except Exception as exc:
                raise DatasetError(
                    f"cannot read label map {path} ({type(exc).__name__}: {exc})"
                ) from None
            bad = labels[(labels != IGNORE_INDEX) & (labels > len(names))]
            if bad.size:
                raise DatasetError(
                    f"category mismatch: label map {path} holds values {bad[:10].tolist()} but "
                    f"there are {len(names)} classes (values 1..{len(names)}, 0 = ignored); set the "
                    "task's 'classes' to the dataset's category list"
                )
    return names


def ade_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, label map)`` paths of an ADE20K split (``train`` / ``val``), sorted by name, as
    :func:`check_ade` checked them (every ``.jpg`` of ``images/<split>`` with its ``.png``)."""
    d = ADE_SPLITS[split]
    return [(p, root / "annotations" / d / f"{p.stem}.png")
            for p in sorted((root / "images" / d).glob("*.jpg"))]  # fmt: skip


def _resolve_classes(root: Path, classes: list[str] | None) -> list[str]:
    listed = None
    for path in (root / "classes.json", root.parent / "classes.json"):
        if path.is_file():
            try:
                listed = [str(c) for c in json.loads(path.read_text(encoding="utf-8"))]
            except (OSError, ValueError) as exc:
                raise DatasetError(f"cannot read {path}: {exc}") from None
            break
    if classes is not None:
        if listed is not None and list(classes) != listed:
            raise DatasetError(
                f"category mismatch: the task's classes {list(classes)[:10]} differ from "
                f"{root / 'classes.json'} ({listed[:10]}); remove 'classes' from the task config"
            )
        return list(classes)
    if listed is not None:
        return listed
    from mmseg.datasets import ADE20KDataset

    return list(ADE20KDataset.METAINFO["classes"])


# --------------------------------------------------------------------------- mm config


def _backbone_and_neck(
    cfg: SegmentationConfig, encoder: EncoderConfig, init_checkpoint: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None, list[int]]:
    """ViT: four blocks' maps rescaled to strides 4-32 by the multi-level neck (BEiT / MAE).
    Swin: mmseg's Swin (our weights mapped in), UperNet directly on its stages (Swin's ADE20K
    setting); SwinV2: our SwinV2 itself (:mod:`downstream._mm.swinv2_dense`) on its stages.
    Returns the backbone, the neck (``None``: none) and the channels of the levels."""
    if encoder.is_hierarchical and cfg.out_indices is not None:
        raise ConfigError(f"out_indices picks ViT blocks; a {encoder.family} encoder always feeds "
                          "UperNet all of its stages: remove out_indices from the task config")  # fmt: skip
    if encoder.family == "swinv2":
        from ._mm.swinv2_dense import swinv2_stage_channels

        backbone = dict(type="MimSwinV2", encoder=encoder.model_dump(mode="json"),
                        img_size=cfg.crop_size, drop_path_rate=cfg.drop_path_rate,
                        init_checkpoint=init_checkpoint)  # fmt: skip
        return backbone, None, swinv2_stage_channels(encoder)
    if encoder.family == "swin":
        from ._mm.swin_dense import mm_swin_kwargs, swin_stage_channels

        swin = mm_swin_kwargs(encoder, cfg.drop_path_rate)
        backbone = dict(type="MimSwin", **swin, init_checkpoint=init_checkpoint)
        return backbone, None, swin_stage_channels(encoder)
    from ._mm.vit_dense import default_out_indices

    d = int(encoder.embed_dim)  # type: ignore[arg-type]
    backbone = dict(
        type="MimViT", encoder=encoder.model_dump(mode="json"),
        out_indices=cfg.out_indices or default_out_indices(int(encoder.depth)),  # type: ignore[arg-type]
        img_size=cfg.crop_size, window_size=0, rel_pos=cfg.rel_pos,
        drop_path_rate=cfg.drop_path_rate, init_checkpoint=init_checkpoint,
    )  # fmt: skip
    neck = dict(type="MimMultiLevelNeck", in_dim=d, patch_size=encoder.patch_size,
                strides=[4, 8, 16, 32], norm="bn")  # fmt: skip
    return backbone, neck, [d] * 4


def build_mm_config(
    cfg: SegmentationConfig,
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
    """The full mmseg config of a run (plain dicts; see the module docstring for the protocol)."""
    c, k = cfg.crop_size, len(classes)
    norm = dict(type="BN", requires_grad=True)
    backbone, neck, channels = _backbone_and_neck(cfg, encoder, init_checkpoint)
    aux = len(channels) - 2  # the third of four levels (BEiT's and Swin's auxiliary FCN input)
    stride = cfg.test_stride or max(1, (2 * c) // 3)
    scale = tuple(cfg.resize_scale) if cfg.resize_scale else (4 * c, c)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(
            type="SegDataPreProcessor", mean=IMG_MEAN, std=IMG_STD, bgr_to_rgb=True, pad_val=0,
            seg_pad_val=IGNORE_INDEX, size=(c, c), test_cfg=dict(size_divisor=32),
        ),
        backbone=backbone,
        **({"neck": neck} if neck else {}),
        decode_head=dict(
            type="UPerHead", in_channels=channels, in_index=list(range(len(channels))),
            pool_scales=(1, 2, 3, 6),
            channels=cfg.decode_channels, dropout_ratio=0.1, num_classes=k, norm_cfg=norm,
            align_corners=False, ignore_index=IGNORE_INDEX,
            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        ),
        auxiliary_head=dict(
            type="FCNHead", in_channels=channels[aux], in_index=aux, channels=cfg.aux_channels,
            num_convs=1,
            concat_input=False, dropout_ratio=0.1, num_classes=k, norm_cfg=norm,
            align_corners=False, ignore_index=IGNORE_INDEX,
            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=cfg.aux_loss_weight),
        ),
        train_cfg=dict(),
        test_cfg=dict(mode="slide", crop_size=(c, c), stride=(stride, stride))
        if cfg.test_mode == "slide" else dict(mode="whole"),
    )  # fmt: skip
    load_ann = dict(type="MimLoadSegAnnotations", num_classes=k)  # reduce_zero_label: the dataset's
    train_pipeline = [
        dict(type="MimLoadImageFromFile"),
        load_ann,
        dict(type="RandomResize", scale=scale, ratio_range=tuple(cfg.ratio_range), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(c, c), cat_max_ratio=cfg.cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
        *([dict(type="PhotoMetricDistortion")] if cfg.photometric else []),
        dict(type="PackSegInputs"),
    ]  # fmt: skip
    test_pipeline = [
        dict(type="MimLoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        load_ann,
        dict(type="PackSegInputs"),
    ]

    def dataset(split: str, pipeline: list[Any]) -> dict[str, Any]:
        return dict(
            type="BaseSegDataset", data_root=str(root), metainfo=dict(classes=tuple(classes)),
            data_prefix=dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"),
            img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True,
            ignore_index=IGNORE_INDEX, pipeline=pipeline,
        )  # fmt: skip

    warmup = min(cfg.warmup_iters, cfg.max_iters - 1)
    lr = cfg.lr * (cfg.batch_size / cfg.lr_base_batch if cfg.lr_base_batch else 1.0)
    layer_decay = cfg.swin_layer_decay if encoder.is_hierarchical else cfg.layer_decay
    sched: list[dict[str, Any]] = []
    if warmup > 0:
        sched.append(dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=warmup))
    sched.append(dict(type="PolyLR", eta_min=0.0, power=cfg.poly_power, by_epoch=False,
                      begin=warmup, end=cfg.max_iters))  # fmt: skip
    out = runtime_config(
        scope="mmseg", module="downstream._mm.mmseg_modules", work_dir=work_dir,
        experiment_name=experiment_name, seed=seed, max_iters=cfg.max_iters,
        val_interval=cfg.val_interval, checkpoint_interval=cfg.checkpoint_interval,
        log_interval=cfg.log_interval, log_level=cfg.log_level,
    )  # fmt: skip
    out.update(
        model=model,
        train_dataloader=dataloader(dataset(ADE_SPLITS["train"], train_pipeline), cfg.batch_size,
                                    num_workers, True),
        optim_wrapper=optim_config(lr=lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                                   layer_decay=layer_decay, amp=amp, clip_grad=cfg.clip_grad),
        param_scheduler=sched,
    )  # fmt: skip
    if with_val:
        out.update(
            val_dataloader=dataloader(
                dataset(ADE_SPLITS["val"], test_pipeline), 1, num_workers, False
            ),
            val_cfg=dict(type="ValLoop"),
            val_evaluator=dict(type="IoUMetric", iou_metrics=["mIoU"]),
        )
    if not save_checkpoints:
        out["default_hooks"]["checkpoint"] = None
    return out


# --------------------------------------------------------------------------- task


@register_task("segmentation")
class Segmentation(Task):
    """ADE20K UperNet on multi-level ViT features (see the module docstring)."""

    name = "segmentation"
    version = 1
    metrics = {"miou": True}
    config_cls = SegmentationConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """Fail early (before any training) on a dataset this task cannot read."""
        assert isinstance(cfg, SegmentationConfig)
        check_ade(resolve_ade_root(data), cfg.classes)

    def bench_pipeline(self, arch: str, iters: int, count_flops: bool, batch_size: int | None = None,
                       size: int | None = None, threads: int | None = None) -> PipelineBench:
        """mmengine training iterations on synthetic ADE20K scenes (batch 2: UperNet's BatchNorm after its 1 x 1
        pooling branch cannot train on one image; crop 512 by default) (:func:`downstream._mm.bench.time_training`)."""
        batch = batch_size or 2

        def build(data: Path, mm_kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
            from ._mm import mmseg_modules  # noqa: F401  (registers our modules with mmseg)

            cfg = SegmentationConfig(crop_size=size or 512, batch_size=batch, max_iters=iters,
                                     log_level="WARNING", log_interval=1)
            ade = data / "ade20k" / "ADEChallengeData2016"
            mm = build_mm_config(cfg, root=ade, classes=check_ade(ade, None), **mm_kwargs)
            return mm, f"{cfg.crop_size}x{cfg.crop_size}"

        return time_training(self.name, arch, iters, batch, threads, count_flops, build)

    def run(self, encoder: Encoder, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, SegmentationConfig)
        from ._mm import dense

        dense.dense_family(encoder, "segmentation")
        root = resolve_ade_root(ctx.data)
        classes = check_ade(root, cfg.classes)
        res = dense.run_dense_task(
            "segmentation", encoder, ctx,
            lambda init, work_dir, exp, amp: build_mm_config(
                cfg, encoder.cfg, root, classes, init, work_dir, exp, seed=ctx.seed,
                num_workers=ctx.data.num_workers, amp=amp),
            module="downstream._mm.mmseg_modules", amp=cfg.amp,
        )  # fmt: skip
        if "mIoU" not in res.metrics:
            raise RuntimeError(f"segmentation: the evaluator returned no mIoU ({res.metrics})")
        miou = float(res.metrics["mIoU"])
        ctx.log(f"[segmentation] mIoU {miou:.2f}  ({res.seconds_per_iter():.2f} s/iter, "
                f"{res.wall_seconds:.0f} s)")  # fmt: skip
        return TaskResult(metrics={"miou": miou}, details={
            "aacc": float(res.metrics.get("aAcc", float("nan"))),
            "macc": float(res.metrics.get("mAcc", float("nan"))),
            "classes": classes, "data_root": str(root), **dense.run_details(res),
        })  # fmt: skip
