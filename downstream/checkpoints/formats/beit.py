"""``beit``: BEiT's release (Bao et al. 2022, github.com/microsoft/unilm/tree/master/beit)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_beit_like, has_beit_keys
from downstream.checkpoints.report import ImportReport


@register_format
class BeitFormat(CheckpointFormat):
    """timm-Beit keys (relative position bias, layer scale ``blocks.i.gamma_1``, separate q / v
    biases) onto the BEiT wrapper: ``lm_head`` and classifier heads dropped, index buffers
    rebuilt, the encoder's mask token kept. The number of heads is read from the relative
    position tables; the BEiT switches (absolute / relative / shared position bias, layer scale,
    qkv bias) from which keys exist.
    """

    name = "beit"
    detect_rank = 50

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return has_beit_keys(state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        return "beit", convert_beit_like(state, report)
