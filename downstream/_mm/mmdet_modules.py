"""Our ViTDet backbone and simple feature pyramid in mmdet's MODELS registry (imports mmdet).

Importing this module registers ``MimViTDetBackbone`` (:class:`~downstream._mm.vit_dense.DenseViT`
returning the last block's map) and ``MimSimpleFPN`` (ViTDet's simple feature pyramid, Li et al.
2022), plus the shared pieces of :mod:`downstream._mm.common`. Generated detection configs name
this module in ``custom_imports`` so that mmdet's own tools can load them.
"""

from __future__ import annotations

from mmdet.registry import MODELS

from . import common  # noqa: F401  (registers MimLN2d, the LLRD constructor, the image loader)
from .vit_dense import DenseViT, SimpleFeaturePyramid


@MODELS.register_module(name="MimViTDetBackbone", force=True)
class MimViTDetBackbone(DenseViT):
    """A plain ViT with window attention for ViTDet (see :class:`DenseViT`)."""


@MODELS.register_module(name="MimSimpleFPN", force=True)
class MimSimpleFPN(SimpleFeaturePyramid):
    """ViTDet's simple feature pyramid (see :class:`SimpleFeaturePyramid`)."""
