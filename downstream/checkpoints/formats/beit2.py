"""``beit2``: BEiT v2's pretraining release (Peng et al. 2022,
github.com/microsoft/unilm/tree/master/beit2)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_beit_like, has_beit_keys
from downstream.checkpoints.report import ImportReport

#: The patch-aggregation head of ``VisionTransformerForMaskedImageModelingCLS``
#: (``modeling_pretrain.py``): extra blocks on an early layer's patches and the final class
#: token, with their norm and head when not shared.
_CLS_PT = ("cls_pt_layers.", "cls_pt_norm.", "cls_pt_lm_head.")


@register_format
class Beit2Format(CheckpointFormat):
    """BEiT's keys (as ``beit``: relative position bias, layer scale, q / v biases, the encoder's
    mask token kept, ``lm_head`` and index buffers dropped) plus the patch-aggregation head
    (``cls_pt_layers``, ``cls_pt_norm``, ``cls_pt_lm_head``), which is pretraining-only and
    dropped. A BEiT v2 file without that head (a fine-tuning-ready export) is a ``beit`` file.
    """

    name = "beit2"
    detect_rank = 45

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return has_beit_keys(state) and any(k.startswith(_CLS_PT) for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        st = {}
        for k, v in state.items():
            if k.startswith(_CLS_PT):
                report.drop("BEiT v2 patch-aggregation head (cls_pt_*)", k)
            else:
                st[k] = v
        return "beit", convert_beit_like(st, report)
