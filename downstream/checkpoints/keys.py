"""Key conversions that several checkpoint formats share: timm-layout ViT, BEiT and Swin state
dicts onto our wrappers' (timm) keys.

Each drops what is not the encoder (classifier heads, index buffers) into the report by reason;
an encoder-side mask token is returned under :data:`MASK_TOKEN` for the loader.
"""

from __future__ import annotations

import re

import torch

from downstream.checkpoints.report import ImportReport
from harness.core.errors import CheckpointError

#: Where a converted state dict carries the checkpoint's encoder-side mask token (if any).
MASK_TOKEN = "__mask_token__"


def is_head_key(k: str) -> bool:
    """Whether ``k`` belongs to a classifier head (timm's names)."""
    return k.startswith(("head.", "head_dist.", "fc_norm.", "pre_logits."))


def convert_vit_like(
    state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """timm-layout ViT keys -> our ViTEncoder's (timm) keys: drop heads, fold layer scale, add
    missing qkv biases; the mask token goes under :data:`MASK_TOKEN`."""
    out: dict[str, torch.Tensor] = {}
    gammas: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_head_key(k):
            report.drop("classifier head", k)
        elif re.match(r"blocks\.\d+\.ls[12]\.gamma$", k):
            gammas[k] = v
        elif k in ("mask_token",):
            out[MASK_TOKEN] = v
        else:
            out[k] = v
    _fold_layer_scale(out, gammas, report)
    _insert_zero_qkv_biases(out, report)
    return out


def _fold_layer_scale(
    out: dict[str, torch.Tensor], gammas: dict[str, torch.Tensor], report: ImportReport
) -> None:
    """Fold each layer-scale vector into the linear layer before it (``attn.proj`` for ``ls1``,
    ``mlp.fc2`` for ``ls2``): ``g * (W x + b) = (g[:, None] W) x + g b``, exact (CaiT, Touvron et
    al. 2021, introduced layer scale). A gamma without its layer stays for the 'unexpected' list."""
    for k, g in sorted(gammas.items()):
        i, which = re.match(r"blocks\.(\d+)\.ls([12])\.gamma$", k).groups()  # type: ignore[union-attr]
        lin = f"blocks.{i}.attn.proj" if which == "1" else f"blocks.{i}.mlp.fc2"
        if f"{lin}.weight" not in out:
            out[k] = g  # left for the 'unexpected' report
            continue
        out[f"{lin}.weight"] = out[f"{lin}.weight"] * g[:, None]  # [out, in] * [out, 1]
        if f"{lin}.bias" in out:
            out[f"{lin}.bias"] = out[f"{lin}.bias"] * g
    if gammas:
        report.notes.append(
            f"folded {len(gammas)} layer-scale vectors into attn.proj / mlp.fc2 (exact)"
        )


def _insert_zero_qkv_biases(out: dict[str, torch.Tensor], report: ImportReport) -> None:
    """Zero biases for every ``attn.qkv`` without one (``qkv_bias=False`` models), exact."""
    added = 0
    for k in list(out):
        m = re.match(r"(blocks\.\d+\.attn\.qkv)\.weight$", k)
        if m and f"{m.group(1)}.bias" not in out:
            out[f"{m.group(1)}.bias"] = torch.zeros(out[k].shape[0], dtype=out[k].dtype)
            added += 1
    if added:
        report.notes.append(f"qkv had no bias in {added} blocks: zeros inserted (exact)")


def convert_beit_like(
    state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """BEiT-layout keys (BEiT, SimMIM's ViT) -> timm Beit keys: drop heads and index buffers."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_head_key(k) or k.startswith("lm_head."):
            report.drop("classifier / token-prediction head", k)
        elif k.endswith("relative_position_index"):
            report.drop("index buffer (rebuilt)", k)
        elif k == "mask_token":
            out[MASK_TOKEN] = v
        else:
            out[k] = v
    return out


def beit_options_from_keys(state: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Which BEiT switches a (timm-Beit-keyed) state dict was trained with."""
    return {
        "use_abs_pos_emb": "pos_embed" in state,
        "use_rel_pos_bias": any(
            re.match(r"blocks\.\d+\.attn\.relative_position_bias_table$", k) for k in state
        ),
        "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in state,
        "layer_scale": any(k.endswith(".gamma_1") for k in state),
        "qkv_bias": any(k.endswith("attn.q_bias") for k in state),
    }


def swin_wrapper(state: dict[str, torch.Tensor]) -> str:
    """``swinv2`` for Swin-layout keys with SwinV2's continuous position bias MLP (``cpb_mlp``),
    else ``swin``: the two share every other key name."""
    return "swinv2" if any(".attn.cpb_mlp." in k for k in state) else "swin"


def convert_plain_swin(
    state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """timm / Swin-repo Swin or SwinV2 keys: drop the classifier head; the mask token goes under
    :data:`MASK_TOKEN`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if is_head_key(k):
            report.drop("classifier head", k)
        elif k == "mask_token":
            out[MASK_TOKEN] = v
        else:
            out[k] = v  # layout differences (downsample placement, buffers) are timm's filter's job
    return out


def has_beit_keys(state: dict[str, torch.Tensor]) -> bool:
    """Whether timm-layout keys are a BEiT's: layer scale ``gamma_1``, separate q / v biases or
    relative position bias tables (a plain timm ViT has none of them)."""
    return any(
        k.endswith((".gamma_1", "attn.q_bias")) or "relative_position_bias_table" in k
        for k in state
    )


def split_layout(
    state: dict[str, torch.Tensor],
    encoder_prefix: str,
    dropped: dict[str, str],
    report: ImportReport,
    layout: str,
) -> dict[str, torch.Tensor]:
    """The encoder's keys of a release (``encoder_prefix`` removed; ``''``: every key not
    dropped); keys starting with a prefix of ``dropped`` go to the report under its reason.

    Raises:
        CheckpointError: for any other key, naming them: a layout only partly understood is
            refused, never loaded half-way.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for k, v in state.items():
        reason = next((r for p, r in dropped.items() if k.startswith(p)), None)
        if reason is not None:
            report.drop(reason, k)
        elif k.startswith(encoder_prefix):
            out[k.removeprefix(encoder_prefix)] = v
        else:
            unknown.append(k)
    if unknown:
        refuse_unplaced(report, layout, unknown)
    return out


def refuse_unplaced(report: ImportReport, layout: str, keys: list[str]) -> None:
    """Refuse a checkpoint whose ``keys`` the ``layout`` does not know.

    Raises:
        CheckpointError: naming the keys (the first 8) and what to do.
    """
    raise CheckpointError(
        f"{report.source}: {len(keys)} key(s) that the {layout} layout cannot place: "
        f"{', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}. Refusing rather than "
        "loading it half-way: check --format (detected: "
        f"{report.detected}), or strip the keys if they are not the encoder's"
    )
