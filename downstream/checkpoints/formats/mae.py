"""``mae``: MAE's release (He et al. 2022, github.com/facebookresearch/mae)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.formats.timm import drop_mae_decoder, is_timm_vit
from downstream.checkpoints.keys import convert_vit_like
from downstream.checkpoints.report import ImportReport


@register_format
class MaeFormat(CheckpointFormat):
    """timm ViT keys under ``model`` (with the pickled ``args``), possibly with the decoder
    (``decoder_*``) and the decoder's ``mask_token`` at the top level; both are dropped and the
    rest maps as a timm ViT (the same assumptions). Detected before plain timm by the decoder
    keys or the ``model`` container.
    """

    name = "mae"
    detect_rank = 60

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return is_timm_vit(state) and (
            any(k.startswith("decoder_") for k in state) or container == "model"
        )

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        return "vit", convert_vit_like(drop_mae_decoder(state, report, True), report)
