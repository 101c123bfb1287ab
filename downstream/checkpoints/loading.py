"""Loading a checkpoint file into one of our encoder wrappers.

:func:`load_checkpoint` reads the file (:mod:`.reading`), detects its format from the registry
(or takes ``fmt``), lets the format convert its keys (:mod:`.formats`), finds the architecture
(:mod:`.architecture`) and loads the weights strictly: a load that leaves encoder weights at
their random init (``missing``) or ignores checkpoint tensors (``unexpected``) is refused unless
``allow_partial``. Position embeddings and relative position bias tables are resized when the
target resolution differs from the checkpoint's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.swin_transformer import checkpoint_filter_fn
from timm.models.swin_transformer_v2 import checkpoint_filter_fn as v2_checkpoint_filter_fn

from downstream.checkpoints.architecture import target_config
from downstream.checkpoints.files import guard_outputs, source_files
from downstream.checkpoints.formats.base import checkpoint_format, detect_family
from downstream.checkpoints.keys import MASK_TOKEN
from downstream.checkpoints.reading import read_checkpoint
from downstream.checkpoints.report import ImportReport
from harness.core.config import EncoderConfig, checkpoint_format_names
from harness.core.errors import CheckpointError
from harness.core.fsutil import sha256_file
from pretrain.encoders import Encoder, create_encoder


def _resize_to(
    enc: Encoder, target: str, state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """Resize position embeddings / relative position tables to the encoder's grid."""
    own = enc.timm_state_dict()  # type: ignore[operator]
    grid = tuple(enc.grid_size)  # type: ignore[attr-defined]
    out = dict(state)
    pe = out.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        prefix = int(own["pos_embed"].shape[1]) - enc.num_patches  # a class position: 1, else 0
        old = math.isqrt(pe.shape[1] - prefix)
        out["pos_embed"] = resample_abs_pos_embed(
            pe.float(), new_size=list(grid), num_prefix_tokens=prefix
        ).to(pe.dtype)
        report.notes.append(f"pos_embed resized {old}x{old} -> {grid[0]}x{grid[1]} (bicubic)")
    if target == "beit":
        n = 0
        for k, v in list(out.items()):
            if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
                out[k] = resize_rel_pos_bias_table(
                    v.float(), new_window_size=grid, new_bias_shape=tuple(own[k].shape)
                ).to(v.dtype)
                n += 1
        if n:
            report.notes.append(
                f"{n} relative position bias table(s) resized to the {grid[0]}x{grid[1]} grid"
            )
    return out


def import_state_dict(
    state: dict[str, torch.Tensor],
    report: ImportReport,
    cfg: EncoderConfig | None = None,
    meta: dict[str, Any] | None = None,
    allow_partial: bool = False,
    img_size: int | None = None,
) -> Encoder:
    """Convert ``state`` (of format ``report.family``) and load it into a new encoder wrapper.

    Args:
        state: The checkpoint's state dict.
        report: The import's report; filled in here.
        cfg: The named architecture, or None (recorded in the file or read from the weights).
        meta: Our metadata of the file, if any.
        allow_partial: Load what matches when keys are missing or unused.
        img_size: The target resolution when no ``cfg`` is given.

    Raises:
        CheckpointError: shape mismatches, or a partial load without ``allow_partial``.
    """
    fmt = checkpoint_format(report.family)
    target, st = fmt.convert(state, report, meta)
    report.target = target
    mask_token = st.pop(MASK_TOKEN, None)
    enc_cfg, options = target_config(target, st, report, cfg, fmt.recorded_meta(meta), img_size)
    enc = create_encoder(enc_cfg, target, options)
    report.encoder = enc_cfg.model_dump(mode="json")
    report.options = options
    st = _align_to(enc, target, st, report)
    own = enc.timm_state_dict()  # type: ignore[operator]
    _check_keys(own, st, report, target, allow_partial)
    _load_weights(enc, {k: v for k, v in st.items() if k in own}, report)
    if mask_token is not None:
        _load_mask_token(enc, mask_token, report)
    return enc


def _align_to(
    enc: Encoder, target: str, st: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """The converted weights in the encoder's layout: timm's Swin filter (the Swin repo's
    layout, rebuilt buffers dropped) or position tables resized to the encoder's grid."""
    if target in ("swin", "swinv2"):
        rebuilt = ("relative_position_index", "attn_mask", "relative_coords_table")
        buffers = [k for k in st if any(b in k for b in rebuilt)]
        for k in buffers:
            report.drop("index / mask buffer (rebuilt)", k)
        keep = {k: v for k, v in st.items() if k not in buffers}
        filt = v2_checkpoint_filter_fn if target == "swinv2" else checkpoint_filter_fn
        return filt(keep, enc.swin)  # type: ignore[attr-defined]
    return _resize_to(enc, target, st, report)


def _check_keys(
    own: dict[str, torch.Tensor],
    st: dict[str, torch.Tensor],
    report: ImportReport,
    target: str,
    allow_partial: bool,
) -> None:
    """Record missing and unexpected keys; refuse shape mismatches, and a partial load unless
    ``allow_partial``, naming the keys and the fix."""
    missing = sorted(set(own) - set(st))
    unexpected = sorted(set(st) - set(own))
    bad = [
        f"{k}: checkpoint {tuple(st[k].shape)} vs encoder {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(st))
        if st[k].shape != own[k].shape
    ]
    report.missing, report.unexpected = missing, unexpected
    if bad:
        raise CheckpointError(
            f"{report.source}: shape mismatches after conversion: {'; '.join(bad[:5])}"
        )
    if (missing or unexpected) and not allow_partial:
        raise CheckpointError(
            f"{report.source} (family {report.family}) does not load completely into the "
            f"{target} encoder: "
            + (
                f"{len(missing)} encoder weights missing from the checkpoint ({', '.join(missing[:6])}) "
                if missing
                else ""
            )
            + (
                f"{len(unexpected)} checkpoint tensors unused ({', '.join(unexpected[:6])}) "
                if unexpected
                else ""
            )
            + "- refusing a partial load. Check --format (detected: "
            f"{report.detected}); pass --allow-partial to load what matches and keep the rest at init"
        )
    report.partial = bool(missing or unexpected)


def _load_weights(enc: Encoder, sd: dict[str, torch.Tensor], report: ImportReport) -> None:
    """Load the encoder's own keys ``sd`` into its timm model (strictly unless partial)."""
    enc.trunk.load_state_dict(sd, strict=not report.partial)
    report.loaded = len(sd)


def _load_mask_token(enc: Encoder, mask_token: torch.Tensor, report: ImportReport) -> None:
    """Copy the checkpoint's encoder-side mask token (one of another width is dropped)."""
    if tuple(mask_token.shape) == tuple(enc.mask_token.shape):  # type: ignore[union-attr]
        with torch.no_grad():
            enc.mask_token.copy_(mask_token)  # type: ignore[union-attr, operator]
        report.notes.append("encoder mask token loaded")
    else:
        report.drop("mask token of another width", "mask_token")


def load_checkpoint(
    path: str | Path,
    cfg: EncoderConfig | None = None,
    fmt: str = "auto",
    allow_partial: bool = False,
    img_size: int | None = None,
) -> tuple[Encoder, ImportReport]:
    """Import any supported checkpoint file as an encoder wrapper.

    Args:
        path: A ``.pth`` / ``.pt`` / ``.bin`` (read weights-only) or ``.safetensors`` file.
        cfg: Target encoder config. ``None``: inferred from the weights (or the file's meta).
            Its ``img_size`` may differ from the checkpoint's: position embeddings are resized.
        fmt: A registered checkpoint format, or ``auto`` to detect it from the keys.
        allow_partial: Load what matches when keys are missing or unused (listed in the report).
        img_size: Target resolution when ``cfg`` is not given (position embeddings are resized).

    Returns:
        ``(encoder, report)``.
    """
    path = Path(path)
    state, meta, container = read_checkpoint(path)
    detected = detect_family(state, meta, container)
    if fmt == "auto":
        if detected is None:
            raise CheckpointError(
                f"cannot tell the format of {path} from its keys (first: {', '.join(list(state)[:6])}); "
                f"pass --format, one of: {', '.join(checkpoint_format_names())}"
            )
        fmt = detected
    checkpoint_format(fmt).check_source(path, meta, detected)
    report = ImportReport(
        source=str(path),
        family=fmt,
        detected=detected,
        container=container,
        sha256=sha256_file(path),
    )
    enc = import_state_dict(state, report, cfg, meta, allow_partial, img_size)
    return enc, report


def import_checkpoint(
    src: str | Path,
    dst: str | Path,
    cfg: EncoderConfig | None = None,
    fmt: str = "auto",
    allow_partial: bool = False,
    img_size: int | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Import ``src`` and write it as a mimbench encoder file ``dst`` (the report in its meta).

    ``dst`` is written atomically, only once the import succeeded; it may not be ``src`` (or its
    sidecar) and may replace an existing file only with ``overwrite``.
    """
    guard_outputs([Path(dst)], source_files(src), overwrite)
    enc, report = load_checkpoint(src, cfg, fmt, allow_partial, img_size)
    enc.save_timm(dst, meta={"imported": report.summary()})  # type: ignore[operator]
    return report
