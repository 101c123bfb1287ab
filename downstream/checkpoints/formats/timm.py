"""``timm``: a timm ``VisionTransformer`` state dict (DeiT's, DINO's, a hub
``model.safetensors``)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_vit_like
from downstream.checkpoints.report import ImportReport


def is_timm_vit(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` has timm's ViT layout (a class token and ``blocks.i``)."""
    return "cls_token" in state and any(k.startswith("blocks.") for k in state)


def drop_mae_decoder(
    state: dict[str, torch.Tensor], report: ImportReport, decoder_mask_token: bool
) -> dict[str, torch.Tensor]:
    """``state`` without MAE's decoder (``decoder_*`` / ``decoder.*``); with
    ``decoder_mask_token``, the top-level ``mask_token`` is the decoder's and is dropped too."""
    st = {}
    for k, v in state.items():
        if k.startswith(("decoder_", "decoder.")):
            report.drop("MAE decoder", k)
        elif decoder_mask_token and k == "mask_token":
            report.drop("MAE decoder's mask token", k)
        else:
            st[k] = v
    return st


@register_format
class TimmFormat(CheckpointFormat):
    """timm's ViT keys onto the ViT wrapper: classifier heads dropped, layer scale folded into
    the preceding linear layer and absent qkv biases inserted as zeros (both exact). Assumes one
    class token with its own position embedding; the number of heads (not in the weights) comes
    from the named architecture or the public convention of the width (reported as assumed).
    """

    name = "timm"
    detect_rank = 70

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return is_timm_vit(state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        return "vit", convert_vit_like(drop_mae_decoder(state, report, False), report)
