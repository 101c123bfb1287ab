"""``mimbench``: our own encoder files (``mimbench export`` / ``import``, an encoder's
``save_timm``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.reading import is_encoder_meta
from downstream.checkpoints.report import ImportReport
from harness.core.errors import CheckpointError


@register_format
class MimbenchFormat(CheckpointFormat):
    """Our encoder files: the wrapper's timm keys as they are, with our metadata (in the file as
    ``{'state_dict', 'mimbench'}``, in safetensors metadata or in the ``.json`` sidecar of an
    export). Detected by that metadata alone. Assumes nothing: the metadata records the wrapper
    (``family``), the encoder config and BEiT's options.
    """

    name = "mimbench"
    detect_rank = 0

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return is_encoder_meta(meta)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        return str((meta or {}).get("family", "vit")), dict(state)

    def recorded_meta(self, meta: dict[str, Any] | None) -> dict[str, Any] | None:
        return meta if is_encoder_meta(meta) else None

    def check_source(self, path: Path, meta: dict[str, Any] | None, detected: str | None) -> None:
        if not is_encoder_meta(meta):
            raise CheckpointError(
                f"{path} has no mimbench metadata: use another --format (detected {detected})"
            )
