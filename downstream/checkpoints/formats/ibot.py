"""``ibot``: iBOT's release (Zhou et al., ICLR 2022, github.com/bytedance/ibot)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_vit_like, split_layout
from downstream.checkpoints.report import ImportReport


@register_format
class IbotFormat(CheckpointFormat):
    """iBOT's full checkpoint, ``main_ibot.py`` ``save_dict``: ``student`` (DDP, ``module.``),
    ``teacher``, ``optimizer``, ``epoch``, ``args``, ``ibot_loss`` (and ``fp16_scaler``). The
    reader takes ``teacher`` (which iBOT evaluates) over ``student``. Each is a
    ``utils.MultiCropWrapper``: the ViT of ``models/vision_transformer.py`` (timm's key names:
    ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,
    norm2,mlp.fc1,mlp.fc2}``, ``norm``) under ``backbone.`` beside ``iBOTHead`` under ``head.``
    (the DINO class-token head and the patch head, dropped). The backbone maps as a timm ViT.
    Only the student is built with ``masked_im_modeling``, so the released teacher has no mask
    token; a ``masked_embed`` ``[1, D]`` where present becomes the encoder's. Any key outside
    ``backbone.`` / ``head.`` is refused. Detected before mmpretrain (whose ``backbone.`` holds
    ``layers.i``, not ``blocks.i``). The README's ``backbone`` downloads
    (``extract_backbone_weights.py``: ``{"state_dict": backbone keys}``) are plain timm ViTs.
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
