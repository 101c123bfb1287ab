"""Published layouts that the encoder contract cannot hold yet: ``capi`` and ``aim``. They are
recognised (so that a file of them is not mistaken for another format) and refused with the
piece that is missing; each is one class, as the formats that load."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.report import ImportReport
from harness.core.errors import CheckpointError


class RefusedFormat(CheckpointFormat):
    """A recognised layout that no encoder family holds: ``convert`` refuses with ``missing``."""

    #: The release, and what the encoder contract lacks to hold it (the error message).
    release: ClassVar[str]
    missing: ClassVar[str]

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        raise CheckpointError(
            f"{report.source} is a {self.release} checkpoint, which cannot be imported: "
            f"{self.missing}"
        )


@register_format
class CapiFormat(RefusedFormat):
    """CAPI (Darcet et al., 2025; facebookresearch/capi ``model.py``, ``EncoderDecoder``)."""

    name = "capi"
    detect_rank = 5
    release = "CAPI (facebookresearch/capi)"
    missing = (
        "its attention applies rotary position embeddings (encoder.blocks.N.residual1.fn.rope."
        "freqs) to separate q / k / v projections and its norms are RMSNorm; no encoder family "
        "here has rotary positions or RMSNorm (its 16 register tokens, 'registers', would also "
        "need prefix tokens beyond one class token). Evaluate it through CAPI's own code, or add "
        "an encoder family with RoPE, RMSNorm and register tokens"
    )

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return "registers" in state or any(".residual1.fn.rope." in k for k in state)


@register_format
class AimFormat(RefusedFormat):
    """AIM (El-Nouby et al., ICML 2024; apple/ml-aim ``aim-v1``: ``preprocessor`` / ``trunk``)."""

    name = "aim"
    detect_rank = 6
    release = "AIM (apple/ml-aim)"
    missing = (
        "its patch embedding is followed by a LayerNorm before the sin-cos positions "
        "(preprocessor.patchifier.norm), which no encoder family here has; its positions are "
        "computed, not stored, and its features are the average of intermediate blocks read by "
        "an attention-pooling head (pretraining used prefix-causal attention). Add an encoder "
        "family with a patch-embedding norm to import it"
    )

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith(("preprocessor.patchifier.", "trunk.blocks.")) for k in state)
