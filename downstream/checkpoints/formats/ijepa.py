"""``ijepa``: I-JEPA's release (Assran et al., CVPR 2023, github.com/facebookresearch/ijepa)."""

from __future__ import annotations

import re
from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_vit_like, refuse_unplaced
from downstream.checkpoints.report import ImportReport

#: The keys of I-JEPA's ``VisionTransformer`` (``src/models/vision_transformer.py``).
_ENCODER_KEY = re.compile(
    r"(patch_embed\.proj\.(weight|bias)|pos_embed|blocks\.\d+\..+|norm\.(weight|bias))$"
)


@register_format
class IjepaFormat(CheckpointFormat):
    """The EMA target encoder (``target_encoder``, which I-JEPA evaluates; the reader takes it
    over ``encoder`` and the predictor, and strips DDP's ``module.``) onto the ``vit_avgpool``
    wrapper: no class token (features are the average of the output tokens), the sin-cos
    position embedding over the patches as stored, timm's block keys, the final norm. Any other
    key is refused. The number of heads is not in the weights: the named architecture or the
    public convention of the width (assumed; I-JEPA's ViT-H/14 has 16 heads, as timm's).
    """

    name = "ijepa"
    detect_rank = 65

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        no_cls = "cls_token" not in state and "pos_embed" in state
        vit = "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)
        return container == "target_encoder" or (no_cls and vit)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        unknown = [k for k in state if not _ENCODER_KEY.match(k)]
        if unknown:
            refuse_unplaced(report, "I-JEPA target encoder", unknown)
        return "vit_avgpool", convert_vit_like(dict(state), report)
