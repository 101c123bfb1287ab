"""``ibot``: iBOT's release (Zhou et al., ICLR 2022, github.com/bytedance/ibot)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_vit_like, split_layout
from downstream.checkpoints.report import ImportReport


@register_format
class IbotFormat(CheckpointFormat):
    """The teacher (``teacher``, which iBOT evaluates; the reader takes it over ``student``):
    a DINO-style timm ViT under ``backbone.`` beside the projection head under ``head.``
    (``iBOTHead``: the DINO class-token head and the patch head, dropped). The backbone maps as a
    timm ViT; its mask token ``masked_embed`` ``[1, D]`` becomes the encoder's. Any key outside
    ``backbone.`` / ``head.`` is refused. Detected before mmpretrain (whose ``backbone.`` holds
    ``layers.i``, not ``blocks.i``).
    """

    name = "ibot"
    detect_rank = 8

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith("backbone.blocks.") for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        inner = split_layout(
            state, "backbone.", {"head.": "iBOT projection head (DINO + patch heads)"}, report,
            "iBOT",
        )  # fmt: skip
        if "masked_embed" in inner:
            inner["mask_token"] = inner.pop("masked_embed").reshape(1, 1, -1)  # [1, D] -> [1, 1, D]
        return "vit", convert_vit_like(inner, report)
