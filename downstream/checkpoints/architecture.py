"""The encoder config a checkpoint is loaded into: recorded in our own files, otherwise read
from the weights.

The architecture is never guessed silently. Our own files (encoder files, their ``.json``
sidecars and safetensors metadata, pretraining ``checkpoint.pth``) record it, and a named
architecture (``--arch``, a suite's ``encoder:``) that differs from the recorded one is an error.
A ViT's number of heads is not visible in its weights: it comes from the recorded config, the
named one, or a relative position bias table; otherwise only the public widths whose head count
every release shares (ViT-Ti/S/B/L/H: 192/384/768/1024/1280 -> 3/6/12/16/16) are taken, and
listed as ``assumed`` in the report; any other width is refused with what to pass.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from downstream.checkpoints.keys import beit_options_from_keys
from downstream.checkpoints.report import ImportReport
from harness.core.config import ENCODER_PRESETS, EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoders.arch import arch_label, check_architecture
from pretrain.encoders.released import RELEASED_FAMILIES
from pretrain.encoders.released import options_from_keys as released_options

#: Widths whose head count every public ViT release shares (DeiT / ViT / MAE / BEiT / DINO).
_PUBLIC_VIT_HEADS: dict[int, tuple[int, str]] = {
    192: (3, "ViT-Ti"),
    384: (6, "ViT-S"),
    768: (12, "ViT-B"),
    1024: (16, "ViT-L"),
    1280: (16, "ViT-H"),
}


def _presets_of_shape(s: dict[str, Any]) -> list[str]:
    """ViT presets whose shape (width, depth, patch, mlp ratio) is that of the weights."""
    return [
        n
        for n, p in ENCODER_PRESETS.items()
        if p.get("family", "vit") == "vit"
        and all(p[k] == s[k] for k in ("embed_dim", "depth", "patch_size"))
        and math.isclose(float(p["mlp_ratio"]), s["mlp_ratio"])
    ]


def _standard_heads(s: dict[str, Any], report: ImportReport) -> int:
    """The number of heads of a ViT whose file does not hold it: the public convention of its
    width, reported as assumed; refused (saying what to pass) for any other width, or where a
    preset of the same shape disagrees with the convention."""
    dim = s["embed_dim"]
    matches = _presets_of_shape(s)
    preset_heads = {int(ENCODER_PRESETS[n]["num_heads"]) for n in matches}
    public = _PUBLIC_VIT_HEADS.get(dim)
    if public is None or preset_heads - {public[0]}:
        hint = (
            "; its shape is that of preset " + ", ".join(
                f"{n} (num_heads {ENCODER_PRESETS[n]['num_heads']})" for n in matches
            ) + f": if it was trained as that, pass --arch {matches[0]}"
            if matches
            else ""
        )
        raise CheckpointError(
            f"{report.source}: cannot infer num_heads for embed_dim {dim}: the weights do not "
            "hold the number of attention heads and no metadata or relative position table says "
            f"it{hint}. Give the architecture the checkpoint was trained with: --arch PRESET "
            "(mimbench eval / import / export), or a suite entry's 'encoder: {arch: PRESET, "
            "num_heads: N, ...}' (mimbench eval: --set encoders.0.encoder.num_heads=N)"
        )
    heads, name = public
    report.assumed.append(
        f"num_heads {heads}: the weights do not hold it; {heads} is the head count of every "
        f"public width-{dim} ViT ({name}). If this checkpoint used another, pass --arch / the "
        "suite's 'encoder: {num_heads: N}'"
    )
    return heads


def nearest_vit_preset(dim: int, depth: int, patch: int) -> str:
    """The ViT preset of that shape, else the closest in width, then depth (its ``arch`` label)."""
    vits = {n: p for n, p in ENCODER_PRESETS.items() if p.get("family", "vit") == "vit"}
    for n, p in vits.items():
        if (p["embed_dim"], p["depth"], p["patch_size"]) == (dim, depth, patch):
            return n
    return min(vits, key=lambda n: (abs(vits[n]["embed_dim"] - dim), abs(vits[n]["depth"] - depth)))


def _vit_shape(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Width, patch, depth, mlp ratio, grid and (from a relative position table) heads of
    timm-keyed ViT / BEiT weights; None where the weights do not tell."""
    w = state.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        raise CheckpointError(
            f"{source}: no patch embedding ('patch_embed.proj.weight') after conversion"
        )
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks ('blocks.N.*') after conversion")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / dim if fc1 is not None else 4.0
    grid = None
    if "pos_embed" in state:
        grid = _pos_grid(int(state["pos_embed"].shape[1]))
    else:
        tables = [v for k, v in state.items() if k.endswith("relative_position_bias_table")]
        if tables:
            side = math.isqrt(int(tables[0].shape[0]) - 3)
            grid = (side + 1) // 2
    heads = None
    tables = [v for k, v in state.items() if k.endswith("relative_position_bias_table")]
    if tables:
        heads = int(tables[0].shape[1])
    return {
        "embed_dim": dim,
        "patch_size": patch,
        "depth": max(blocks) + 1,
        "mlp_ratio": mlp_ratio,
        "grid": grid,
        "heads": heads,
    }


def _pos_grid(n: int) -> int | None:
    """The grid side of a position embedding of ``n`` entries: ``g * g`` patches, plus one for
    the class token when it has a position (timm's ViT); None when neither fits. ``1 + g * g``
    is never a square for ``g >= 1``, so the two layouts cannot be confused."""
    for prefix in (0, 1):
        g = math.isqrt(n - prefix)
        if g > 0 and g * g == n - prefix:
            return g
    return None


def _target_vit_config(
    state: dict[str, torch.Tensor], cfg: EncoderConfig | None, report: ImportReport
) -> EncoderConfig:
    """A ViT / BEiT config for the weights: the named one if they fit it, else read from them."""
    s = _vit_shape(state, report.source)
    if cfg is not None:
        _check_named_vit(s, cfg, report)
        report.notes.append(f"num_heads {cfg.num_heads} from the given encoder config")
        return cfg.model_copy(update={"pos_embed": "learned"})
    heads = s["heads"]
    if heads is not None:
        report.notes.append(f"num_heads {heads} read from the relative position bias table")
    else:
        heads = _standard_heads(s, report)
    if s["grid"] is None:
        raise CheckpointError(
            f"{report.source}: cannot tell the training resolution (no position embedding or "
            "relative position table): give the encoder config with img_size"
        )
    return EncoderConfig(
        arch=nearest_vit_preset(s["embed_dim"], s["depth"], s["patch_size"]),
        img_size=s["grid"] * s["patch_size"],
        patch_size=s["patch_size"],
        embed_dim=s["embed_dim"],
        depth=s["depth"],
        num_heads=heads,
        mlp_ratio=s["mlp_ratio"],
        pos_embed="learned",
    )


def _check_named_vit(s: dict[str, Any], cfg: EncoderConfig, report: ImportReport) -> None:
    """Refuse a named architecture that the weights' shape ``s`` (:func:`_vit_shape`) does not
    fit, listing every difference."""
    bad = [
        f"{k}: checkpoint {s[k]} vs config {getattr(cfg, k)}"
        for k in ("embed_dim", "depth", "patch_size")
        if s[k] != getattr(cfg, k)
    ]
    if abs(s["mlp_ratio"] - float(cfg.mlp_ratio)) > 1e-6:  # type: ignore[arg-type]
        bad.append(f"mlp_ratio: checkpoint {s['mlp_ratio']} vs config {cfg.mlp_ratio}")
    if s["heads"] is not None and s["heads"] != cfg.num_heads:
        bad.append(f"num_heads: checkpoint {s['heads']} vs config {cfg.num_heads}")
    if bad:
        raise CheckpointError(
            f"{report.source} does not fit encoder '{cfg.arch}': "
            + "; ".join(bad)
            + ". Fix: give the encoder config the checkpoint was trained with (or none: it is "
            "inferred from the weights)"
        )


def _swin_shape(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """Width, patch, stage depths and heads, window, resolution (from the attention masks) and
    mlp ratio of timm-keyed Swin or SwinV2 weights; None where the weights do not tell.

    Swin: heads and window from the bias tables ``[(2w - 1)^2, heads]``. SwinV2 has no table:
    heads from the bias MLP's output layer ``cpb_mlp.2.weight [heads, hidden]``, the window from
    the Swin repo's stored coordinate table ``relative_coords_table [1, 2w - 1, 2w - 1, 2]``
    (timm does not store it: then the window is unknown)."""
    w = state.get("patch_embed.proj.weight")
    if w is None:
        raise CheckpointError(f"{source}: no Swin patch embedding ('patch_embed.proj.weight')")
    depths: dict[int, int] = {}
    heads: dict[int, int] = {}
    window = None
    img = None
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), b + 1)
            if k.endswith("attn.relative_position_bias_table"):
                heads[s] = int(v.shape[1])
                if s == 0 and b == 0:  # later stages may shrink the window to their grid
                    window = (math.isqrt(int(v.shape[0])) + 1) // 2
            elif k.endswith("attn.cpb_mlp.2.weight"):
                heads[s] = int(v.shape[0])
            elif k.endswith("attn.relative_coords_table") and s == 0 and b == 0:
                window = (int(v.shape[1]) + 1) // 2
    for k, v in state.items():
        if re.match(r"layers\.0\.blocks\.\d+\.attn_mask$", k) and window:
            img = math.isqrt(int(v.shape[0])) * window * int(w.shape[-1])  # [windows, w*w, w*w]
    stages = sorted(depths)
    fc1 = state.get("layers.0.blocks.0.mlp.fc1.weight")
    return {
        "embed_dim": int(w.shape[0]),
        "patch_size": int(w.shape[-1]),
        "stage_depths": tuple(depths[s] for s in stages),
        "stage_heads": tuple(heads.get(s, 0) for s in stages),
        "window_size": window,
        "img_size": img,
        "mlp_ratio": float(fc1.shape[0]) / int(w.shape[0]) if fc1 is not None else 4.0,
    }


def _target_swin_config(
    state: dict[str, torch.Tensor], cfg: EncoderConfig | None, report: ImportReport, family: str
) -> EncoderConfig:
    """The ``family`` (``swin`` / ``swinv2``) preset of the weights' shape (the named one if it
    is that preset). A window the weights do not record (timm's SwinV2 files) is the preset's:
    refused when presets of that shape differ in window and none is named."""
    s = _swin_shape(state, report.source)
    presets = [
        n
        for n, p in ENCODER_PRESETS.items()
        if p.get("family") == family
        and tuple(p["stage_depths"]) == s["stage_depths"]
        and tuple(p["stage_heads"]) == s["stage_heads"]
        and s["window_size"] in (None, p["window_size"])
    ]
    if s["window_size"] is None and cfg is None:
        windows = sorted({ENCODER_PRESETS[n]["window_size"] for n in presets})
        if len(windows) > 1:
            raise CheckpointError(
                f"{report.source} does not record its window size, and the {family} presets of "
                f"its shape have windows {windows} ({presets}): name one with --arch"
            )
        if presets:
            report.assumed.append(
                f"window {windows[0]} from preset {presets[0]} (the weights do not record it)"
            )
    if cfg is not None:
        if cfg.family != family or cfg.arch not in presets:
            raise CheckpointError(
                f"{report.source} is a {family} with stages {s['stage_depths']}, heads {s['stage_heads']}, "
                f"window {s['window_size']}; encoder '{cfg.arch}' does not match"
                + (f": use one of {presets}" if presets else "")
            )
        return cfg
    if not presets:
        raise CheckpointError(
            f"{report.source} is a {family} with stages {s['stage_depths']}, heads {s['stage_heads']} and "
            f"window {s['window_size']}: no {family} preset in ENCODER_PRESETS has that shape (the wrapper "
            "takes stage depths, heads and window from a preset); add one"
        )
    img = s["img_size"] or ENCODER_PRESETS[presets[0]]["img_size"]
    if s["img_size"] is None:
        report.assumed.append(
            f"img_size {img} from preset {presets[0]} (the checkpoint does not say; pass "
            "--img-size if it was trained at another)"
        )
    return EncoderConfig(
        arch=presets[0],
        img_size=img,
        patch_size=s["patch_size"],
        embed_dim=s["embed_dim"],
        mlp_ratio=s["mlp_ratio"],
    )



def target_config(
    target: str,
    state: dict[str, torch.Tensor],
    report: ImportReport,
    cfg: EncoderConfig | None = None,
    recorded: dict[str, Any] | None = None,
    img_size: int | None = None,
) -> tuple[EncoderConfig, dict[str, Any]]:
    """``(encoder config, family options)`` for converted weights ``state`` of wrapper ``target``.

    Args:
        target: The wrapper the weights were converted for (``vit``, ``beit``, ``swin``).
        state: The converted (timm-keyed) weights.
        report: The import's report (notes and assumptions are added).
        cfg: The named architecture, if any (checked against what the file records or holds).
        recorded: Metadata that records the architecture (our own files), else None.
        img_size: The target resolution when no ``cfg`` is given.
    """
    rec = _recorded_config(report, target, recorded)
    if rec is not None:
        enc_cfg = _fit_recorded(rec, cfg, report, recorded or {})
        options = dict((recorded or {}).get(f"{target}_options") or {})
    elif target in ("swin", "swinv2"):
        enc_cfg = _target_swin_config(state, cfg, report, target)
        options = {}
    else:
        enc_cfg = _target_vit_config(state, cfg, report)
        options = _options_from_keys(target, state)
    if img_size is not None and cfg is None and img_size != enc_cfg.img_size:
        enc_cfg = EncoderConfig.model_validate({**enc_cfg.model_dump(), "img_size": img_size})
    if cfg is not None and cfg.drop_path_rate != enc_cfg.drop_path_rate:
        enc_cfg = enc_cfg.model_copy(update={"drop_path_rate": cfg.drop_path_rate})
    return enc_cfg, options


def _options_from_keys(target: str, state: dict[str, torch.Tensor]) -> dict[str, bool]:
    """The family switches that the converted weights of wrapper ``target`` were trained with."""
    if target == "beit":
        return beit_options_from_keys(state)
    if target in RELEASED_FAMILIES:
        return released_options(state)
    return {}


def _recorded_config(
    report: ImportReport, target: str, meta: dict[str, Any] | None
) -> EncoderConfig | None:
    """The encoder config recorded in ``meta`` (our encoder file's or pretraining checkpoint's,
    as the file's format returns it), checked against the weights' wrapper; None without it."""
    if not meta:
        return None
    if not isinstance(meta.get("encoder"), dict):
        raise CheckpointError(
            f"{report.source}: its mimbench metadata holds no encoder config; re-export it, or "
            "import its weights with --format timm and --arch"
        )
    rec = EncoderConfig.model_validate(meta["encoder"])
    # BEiT weights: recorded as a ViT preset (imported BEiTs, switches in beit_options) or as
    # a ViT variant with relative position bias (family 'beit', switches from the config)
    # ... and the released layouts' families are built from a ViT preset as well
    wrappers = ("vit", target) if target == "beit" or target in RELEASED_FAMILIES else (target,)
    if rec.family not in wrappers:
        raise CheckpointError(
            f"{report.source}: its metadata records a {rec.family} encoder ({rec.arch}) but its "
            f"weights are a {target} encoder's: the file is inconsistent; re-export it"
        )
    return rec


def _fit_recorded(
    rec: EncoderConfig, cfg: EncoderConfig | None, report: ImportReport, meta: dict[str, Any]
) -> EncoderConfig:
    """The recorded config, checked against the named one (which may change the resolution)."""
    where = meta.get("recorded_in", "the file's mimbench metadata")
    if cfg is None:
        report.notes.append(f"architecture {arch_label(rec)} from {where}")
        return rec
    check_architecture(cfg, rec, report.source)
    report.notes.append(f"architecture {arch_label(rec)} from {where}, as named")
    if cfg.img_size != rec.img_size:
        rec = EncoderConfig.model_validate({**rec.model_dump(), "img_size": cfg.img_size})
    return rec
