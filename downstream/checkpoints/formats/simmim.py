"""``simmim``: SimMIM's release (Xie et al. 2022, github.com/microsoft/SimMIM)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_beit_like, convert_plain_swin, swin_wrapper
from downstream.checkpoints.report import ImportReport


@register_format
class SimmimFormat(CheckpointFormat):
    """The encoder under ``encoder.`` beside a 1x1-conv decoder (dropped). A ViT encoder is
    SimMIM's BEiT-style ViT (onto the BEiT wrapper, as for ``beit``); an encoder with
    ``layers.i`` is a Swin or SwinV2 in the Swin repo's layout (onto the Swin / SwinV2 wrapper,
    as for ``swin``; SimMIM's SwinV2 runs are in the Swin repo).
    """

    name = "simmim"
    detect_rank = 30

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith("encoder.") for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        st = {}
        for k, v in state.items():
            if k.startswith("encoder."):
                st[k.removeprefix("encoder.")] = v
            else:
                report.drop("SimMIM decoder", k)
        if any(k.startswith("layers.") for k in st):
            return swin_wrapper(st), convert_plain_swin(st, report)
        return "beit", convert_beit_like(st, report)
