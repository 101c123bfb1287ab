"""Our multi-level ViT backbone, its neck and a checked label loader in mmseg's registries
(imports mmseg).

Importing this module registers ``MimViT`` (:class:`~downstream._mm.vit_dense.DenseViT` returning
four blocks' maps), ``MimSwinV2`` (:class:`~downstream._mm.swinv2_dense.DenseSwinV2`), ``MimSwin`` (mmseg's own ``SwinTransformer`` loading our timm-keyed Swin
weights, see :mod:`downstream._mm.swin_dense`), ``MimMultiLevelNeck`` (BEiT / MAE's
deconvolution / pooling neck for UperNet) and ``MimLoadSegAnnotations`` (mmseg's ``LoadAnnotations`` that names an unreadable
label map or a label outside the configured classes), plus the shared pieces of
:mod:`downstream._mm.common`. Generated segmentation configs name this module in
``custom_imports``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mmseg.datasets.transforms import LoadAnnotations
from mmseg.models.backbones import SwinTransformer
from mmseg.registry import MODELS, TRANSFORMS

from harness.core.data.datasets import DatasetError

from . import common  # noqa: F401  (registers the LLRD constructor and the image loader)
from .swin_dense import MimSwinMixin
from .swinv2_dense import DenseSwinV2
from .vit_dense import DenseViT, MultiLevelNeck


@MODELS.register_module(name="MimViT", force=True)
class MimViT(DenseViT):
    """A plain ViT returning several blocks' maps (see :class:`DenseViT`)."""


@MODELS.register_module(name="MimSwin", force=True)
class MimSwin(MimSwinMixin, SwinTransformer):
    """mmseg's Swin with our encoder's weights mapped in (see :class:`MimSwinMixin`)."""


@MODELS.register_module(name="MimSwinV2", force=True)
class MimSwinV2(DenseSwinV2):
    """Our SwinV2 encoder returning its stage maps (see :class:`DenseSwinV2`)."""


@MODELS.register_module(name="MimMultiLevelNeck", force=True)
class MimMultiLevelNeck(MultiLevelNeck):
    """BEiT / MAE's multi-level neck (see :class:`MultiLevelNeck`)."""


@TRANSFORMS.register_module(name="MimLoadSegAnnotations", force=True)
class CheckedLoadSegAnnotations(LoadAnnotations):
    """mmseg's ``LoadAnnotations`` that raises :class:`DatasetError` for an unreadable label map
    and for labels (after ``reduce_zero_label``) outside ``[0, num_classes) + {ignore_index}``.

    Args:
        num_classes: Number of classes of the task config.
        ignore_index: The label that is ignored (255).
        **kwargs: Passed to ``LoadAnnotations`` (``reduce_zero_label``).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def _load_seg_map(self, results: dict[str, Any]) -> None:
        path = results.get("seg_map_path")
        try:
            super()._load_seg_map(results)
        except AssertionError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"cannot read label map {path} ({type(exc).__name__}: {exc}); "
                "replace it, or remove it and its image"
            ) from None
        seg = results["gt_seg_map"]  # [H, W]
        bad = np.unique(seg[(seg != self.ignore_index) & (seg >= self.num_classes)])
        if bad.size:
            shift = " (after reduce_zero_label: file value - 1)" if self.reduce_zero_label else ""
            raise DatasetError(
                f"category mismatch: label map {path} holds labels {bad[:10].tolist()}{shift} but the "
                f"task has {self.num_classes} classes; set the task's 'classes' to the dataset's "
                "category list (ADE20K: 150, or classes.json beside the data)"
            )
