"""``mmpretrain``: OpenMMLab's mmpretrain checkpoints (its ViT, BEiT and Swin backbones)."""

from __future__ import annotations

import re
from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import (
    MASK_TOKEN,
    convert_beit_like,
    convert_vit_like,
    has_beit_keys,
)
from downstream.checkpoints.report import ImportReport
from downstream.swin_keys import mm_to_timm_swin

#: mmpretrain ViT / BEiT names -> timm's, first match wins.
_MMPRE_RULES: list[tuple[str, str]] = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
    (r"^layers\.(\d+)\.attn\.gamma1\.weight$", r"blocks.\1.ls1.gamma"),
    (r"^layers\.(\d+)\.ffn\.gamma2\.weight$", r"blocks.\1.ls2.gamma"),
    (
        r"^layers\.(\d+)\.",
        r"blocks.\1.",
    ),  # attn.qkv, attn.proj, gamma_1/2, q_bias, v_bias, rel tables
    (r"^ln1\.", "norm."),  # the final norm (final_norm=True)
]


@register_format
class MmpretrainFormat(CheckpointFormat):
    """The backbone under ``backbone.`` (the neck, head and data preprocessor are dropped).

    A ViT / BEiT backbone (``layers.i.ln1``, ``ffn.layers``, ``patch_embed.projection``) is
    renamed to timm's keys and maps as ``timm`` (layer scale ``gamma1`` / ``gamma2`` folded) or,
    with BEiT keys, as ``beit``; the head-side ``ln2`` after average pooling is dropped. A Swin
    backbone (``stages.i.blocks.j``) has mmdet's / mmseg's layout, so the dense tasks' mapping
    (:mod:`downstream.swin_keys`) applies inverted. The same assumptions as ``timm`` / ``beit``
    / ``swin`` follow.
    """

    name = "mmpretrain"
    detect_rank = 10

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith("backbone.") for k in state)

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        inner: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if k.startswith("backbone."):
                inner[k.removeprefix("backbone.")] = v
            else:
                report.drop("not the backbone (neck / head / preprocessor)", k)
        if any(k.startswith("stages.") for k in inner):
            return "swin", _convert_swin(inner, report)
        renamed = _rename_vit(inner, report)
        if has_beit_keys(renamed):
            return "beit", convert_beit_like(renamed, report)
        return "vit", convert_vit_like(renamed, report)


def _rename_vit(inner: dict[str, torch.Tensor], report: ImportReport) -> dict[str, torch.Tensor]:
    """mmpretrain ViT / BEiT backbone keys (without ``backbone.``) -> timm's names."""
    renamed: dict[str, torch.Tensor] = {}
    for k, v in inner.items():
        if k.startswith("ln2."):
            report.drop("head-side norm after average pooling (ln2)", f"backbone.{k}")
            continue
        nk = k
        for pat, rep in _MMPRE_RULES:
            nk2 = re.sub(pat, rep, nk)
            if nk2 != nk:
                nk = nk2
                break
        renamed[nk] = v
    return renamed


def _convert_swin(
    inner: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """mmpretrain's Swin backbone (keys without ``backbone.``) -> timm Swin keys.

    Its layout is mmdet's / mmseg's (the same ``PatchMerging`` with ``nn.Unfold``), so the
    dense tasks' mapping (:mod:`downstream.swin_keys`) applies inverted: merging moved to the
    start of the next stage, merged channels back to timm's order, the last stage's output
    norm (``norm{last}``, or ``norm`` in old files) to timm's ``norm``. Keys outside the mapping
    (``absolute_pos_embed``, Swin V2's ``logit_scale`` / ``cpb_mlp``) stay under their names and
    are reported as unexpected.
    """
    st = {k: v for k, v in inner.items() if k != "mask_token"}
    out, dropped, unknown = mm_to_timm_swin(st)
    for reason, keys in dropped.items():
        for k in keys:
            report.drop(reason, f"backbone.{k}")
    for k in unknown:
        out[f"backbone.{k}"] = inner[k]
    if "mask_token" in inner:  # mmpretrain's SimMIMSwinTransformer
        out[MASK_TOKEN] = inner["mask_token"]
    report.notes.append(
        "mmpretrain Swin: patch merging moved to the start of the next stage and its channels "
        "reordered from nn.Unfold's to timm's order (exact)"
    )
    return out
