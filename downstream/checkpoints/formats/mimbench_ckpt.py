"""``mimbench_ckpt``: our pretraining ``checkpoint.pth`` (the whole MIM model)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import MASK_TOKEN, swin_wrapper
from downstream.checkpoints.report import ImportReport


@register_format
class MimbenchCheckpointFormat(CheckpointFormat):
    """A pretraining checkpoint: the encoder wrapper under ``encoder.vit.`` / ``encoder.swin.``
    (its mask token ``encoder.mask_token``) beside the recipe's heads and decoder, which are
    dropped. The architecture comes from the encoder config the engine stores in the checkpoint
    (or the stage's ``config.yaml`` whose hash is the checkpoint's); without either it is read
    from the weights as for a timm file.
    """

    name = "mimbench_ckpt"
    detect_rank = 20

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith(("encoder.vit.", "encoder.swin.")) for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        st = {}
        target = "vit"
        for k, v in state.items():
            if k.startswith("encoder.vit."):
                st[k.removeprefix("encoder.vit.")] = v
            elif k.startswith("encoder.swin."):
                st[k.removeprefix("encoder.swin.")] = v
                target = "swin"  # SwinV2 shares the prefix: told apart below
            elif k == "encoder.mask_token":
                st[MASK_TOKEN] = v
            else:
                report.drop("pretraining head / decoder", k)
        return (swin_wrapper(st) if target == "swin" else target), st

    def recorded_meta(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        return meta or None
