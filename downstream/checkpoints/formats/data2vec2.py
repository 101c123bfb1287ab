"""``data2vec2``: data2vec 2.0's image release (Baevski et al., ICML 2023; fairseq
``examples/data2vec``, ``base_imagenet.pt`` etc.)."""

from __future__ import annotations

import re
from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_vit_like, refuse_unplaced
from downstream.checkpoints.report import ImportReport
from harness.core.errors import CheckpointError

#: The image modality encoder's keys in fairseq's ``Data2VecMultiModel``.
_IMAGE = "modality_encoders.IMAGE."
#: Its embedding keys -> timm's (``modalities/images.py``: ``PatchEmbed``, fixed sin-cos
#: positions over the patches, ``extra_tokens`` prepended, the context encoder's norm).
_RENAME = {
    "local_encoder.proj.weight": "patch_embed.proj.weight",
    "local_encoder.proj.bias": "patch_embed.proj.bias",
    "fixed_positional_encoder.positions": "pos_embed",
    "extra_tokens": "cls_token",
    "context_encoder.norm.weight": "norm_pre.weight",
    "context_encoder.norm.bias": "norm_pre.bias",
}


@register_format
class Data2vec2Format(CheckpointFormat):
    """fairseq's multi-modal model with its ``IMAGE`` modality encoder onto the ``vit_postnorm``
    wrapper (:mod:`pretrain.encoders.released`): the student's weights (as data2vec 2.0
    fine-tunes them), the decoder (``modality_encoders.IMAGE.decoder.*``) dropped and the EMA
    teacher (``_ema``, not a tensor) skipped by the reader. The context encoder's blocks (if
    ``prenet_depth > 0``) run first, so they become the first blocks. Its one extra token is the
    class token, which gets no position; more extra tokens (registers) or any key it does not
    know (ALiBi scales, another modality) are refused. The number of heads is not in the
    weights: the named architecture or the public convention of the width (assumed).
    """

    name = "data2vec2"
    detect_rank = 4

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith(_IMAGE) for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        pre = sorted({int(m.group(1)) for k in state
                      if (m := re.match(rf"{re.escape(_IMAGE)}context_encoder\.blocks\.(\d+)\.", k))})  # fmt: skip
        n_pre = max(pre) + 1 if pre else 0
        out: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        for k, v in state.items():
            nk = self._timm_key(k, n_pre, report)
            if nk is None:
                continue
            if nk == "":
                unknown.append(k)
            else:
                out[nk] = v
        if unknown:
            refuse_unplaced(report, "data2vec 2.0", unknown)
        _check_one_extra_token(out, report)
        if n_pre:
            report.notes.append(f"{n_pre} context-encoder block(s) become blocks 0..{n_pre - 1}")
        return "vit_postnorm", convert_vit_like(out, report)

    @staticmethod
    def _timm_key(k: str, n_pre: int, report: ImportReport) -> str | None:
        """timm's name of key ``k``; None: dropped; ``''``: a key the layout does not know."""
        if k.startswith(f"{_IMAGE}decoder."):
            report.drop("data2vec 2.0 decoder", k)
            return None
        if k.startswith(_IMAGE):
            rest = k.removeprefix(_IMAGE)
            if rest in _RENAME:
                return _RENAME[rest]
            m = re.match(r"context_encoder\.blocks\.(\d+)\.(.+)$", rest)
            return f"blocks.{m.group(1)}.{m.group(2)}" if m else ""
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m:
            return f"blocks.{int(m.group(1)) + n_pre}.{m.group(2)}"
        return k if k in ("norm.weight", "norm.bias") else ""


def _check_one_extra_token(out: dict[str, torch.Tensor], report: ImportReport) -> None:
    """Refuse extra tokens other than one class token (the wrapper holds exactly one)."""
    cls = out.get("cls_token")
    if cls is not None and (cls.ndim != 3 or cls.shape[1] != 1):
        raise CheckpointError(
            f"{report.source}: data2vec 2.0 checkpoint with {tuple(cls.shape)} extra tokens; "
            "the vit_postnorm encoder holds one class token and no register tokens"
        )
