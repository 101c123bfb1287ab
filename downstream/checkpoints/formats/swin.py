"""``swin``: a Swin Transformer or SwinV2 state dict (Liu et al. 2021, 2022; timm's or the Swin
repo's layout)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_plain_swin, swin_wrapper
from downstream.checkpoints.report import ImportReport


@register_format
class SwinFormat(CheckpointFormat):
    """``layers.i.blocks.j`` keys onto the Swin wrapper (SwinV2's, with ``cpb_mlp`` keys, onto
    the SwinV2 wrapper): classifier heads dropped; the Swin
    repo's layout differences (patch merging at the end of a stage, index and mask buffers) are
    left to timm's checkpoint filter. Stage depths, heads and window come from the Swin preset of
    that shape (there must be one); the resolution from the attention masks, else the preset's
    (reported as assumed).
    """

    name = "swin"
    detect_rank = 40

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith("layers.") and ".blocks." in k for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        return swin_wrapper(state), convert_plain_swin(state, report)
