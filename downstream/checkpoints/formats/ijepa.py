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
    """The EMA target encoder onto the ``vit_avgpool`` wrapper.

    The released ``.pth.tar`` is ``src/train.py`` ``save_checkpoint``'s dict: ``encoder``,
    ``predictor``, ``target_encoder`` (each a ``DistributedDataParallel`` state dict, so every
    key starts with ``module.``), ``opt``, ``scaler``, ``epoch``, ``loss``, ``batch_size``,
    ``world_size``, ``lr``. The reader takes ``target_encoder`` over ``encoder`` and strips
    ``module.`` (which of the two the paper evaluates is not in the reference code; CAPI's
    ``baselines/ijepa_loader.py`` loads ``encoder``, the context encoder, with the same keys). ``src/models/vision_transformer.py`` ``VisionTransformer``
    has no class token (features are the average of the output tokens), a fixed sin-cos
    ``pos_embed`` ``[1, N, D]`` over the patches only (a ``requires_grad=False`` parameter, so
    stored), timm's block keys (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
    ``mlp.fc2``) and a final ``norm``. Any other key is refused. The number of heads is not in
    the weights: the named architecture or the public convention of the width (assumed; the
    file's ``vit_huge`` is 1280 wide, depth 32, 16 heads, as timm's ViT-H).
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
