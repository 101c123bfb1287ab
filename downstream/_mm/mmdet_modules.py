"""Our ViTDet backbone and simple feature pyramid in mmdet's MODELS registry (imports mmdet).

Importing this module registers ``MimViTDetBackbone`` (:class:`~downstream._mm.vit_dense.DenseViT`
returning the last block's map), ``MimSimpleFPN`` (ViTDet's simple feature pyramid, Li et al.
2022) and ``MimSwinV2`` (:class:`~downstream._mm.swinv2_dense.DenseSwinV2`), ``MimSwin`` (mmdet's own ``SwinTransformer`` loading our timm-keyed Swin weights, see
:mod:`downstream._mm.swin_dense`), plus the shared pieces of :mod:`downstream._mm.common`. Generated detection configs name
this module in ``custom_imports`` so that mmdet's own tools can load them.
"""

from __future__ import annotations

from mmdet.models.backbones import SwinTransformer
from mmdet.registry import MODELS

from . import common  # noqa: F401  (registers MimLN2d, the LLRD constructor, the image loader)
from .swin_dense import MimSwinMixin
from .swinv2_dense import DenseSwinV2
from .vit_dense import DenseViT, SimpleFeaturePyramid


@MODELS.register_module(name="MimViTDetBackbone", force=True)
class MimViTDetBackbone(DenseViT):
    """A plain ViT with window attention for ViTDet (see :class:`DenseViT`)."""


@MODELS.register_module(name="MimSimpleFPN", force=True)
class MimSimpleFPN(SimpleFeaturePyramid):
    """ViTDet's simple feature pyramid (see :class:`SimpleFeaturePyramid`)."""


@MODELS.register_module(name="MimSwin", force=True)
class MimSwin(MimSwinMixin, SwinTransformer):
    """mmdet's Swin with our encoder's weights mapped in (see :class:`MimSwinMixin`)."""


@MODELS.register_module(name="MimSwinV2", force=True)
class MimSwinV2(DenseSwinV2):
    """Our SwinV2 encoder returning its stage maps (see :class:`DenseSwinV2`)."""
