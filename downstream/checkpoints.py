"""Checkpoint import and export: any ViT-family encoder in, timm state dicts and safetensors out.

Import reads a file weights-only (``torch.load(weights_only=True)`` or safetensors), finds the
state dict inside its container, detects the family from the keys (or takes ``fmt``), converts
the keys to those of one of our encoder wrappers and loads them strictly:

============  =====================================================  ======================
family        what it looks like                                     wrapper
============  =====================================================  ======================
mimbench      our encoder files (``{'state_dict', 'mimbench'}``)     as recorded
mimbench_ckpt our pretraining ``checkpoint.pth`` (``encoder.vit.*``)  ViT / Swin
timm          a timm ``VisionTransformer`` state dict (DINO's too)   ViT
mae           MAE's release: timm keys under ``model`` (+ decoder)   ViT
beit          BEiT's release: relative position bias, layer scale,   BEiT
              q/v biases (``blocks.i.gamma_1``, ...)
simmim        SimMIM's: ``encoder.`` prefix; ViT (BEiT-style) or     BEiT / Swin
              Swin (the Swin repo's layout)
mmpretrain    ``backbone.`` prefix, ``layers.i.ln1``/``ffn.layers``  ViT / BEiT / Swin
              (ViT, BEiT) or ``stages.i.blocks.j`` (Swin)
swin          a Swin state dict (timm's or the Swin repo's layout)   Swin
============  =====================================================  ======================

Keys that belong to something other than the encoder (MAE's decoder, SimMIM's decoder, BEiT's
``lm_head``, classifier heads, mmpretrain's neck, buffers such as ``relative_position_index``)
are dropped and listed by reason. Every other difference is an error naming the keys: a load that
leaves encoder weights at their random init (``missing``) or ignores checkpoint tensors
(``unexpected``) is refused unless ``allow_partial``. Exact conversions are applied and reported:
layer scale folded into the preceding linear layer (timm/mmpretrain ViTs), absent qkv biases
inserted as zeros, absolute position embeddings (bicubic) and relative position bias tables
resized when the target resolution differs from the checkpoint's.

The architecture is never guessed silently. Our own files (encoder files, their ``.json``
sidecars and safetensors metadata, pretraining ``checkpoint.pth``) record it, and a named
architecture (``--arch``, a suite's ``encoder:``) that differs from the recorded one is an error.
A ViT's number of heads is not visible in its weights: it comes from the recorded config, the
named one, or a relative position bias table; otherwise only the public widths whose head count
every release shares (ViT-Ti/S/B/L/H: 192/384/768/1024/1280 -> 3/6/12/16/16) are taken, and
listed as ``assumed`` in the report; any other width is refused with what to pass.

Export writes an encoder as a plain timm state dict (``.pth``), as ``.safetensors`` (with the
timm architecture in its metadata) and a JSON sidecar naming the timm architecture, so that
``timm.create_model(name, checkpoint_path=file, **kwargs)`` loads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.core.config import CHECKPOINT_FORMATS, ENCODER_PRESETS, EncoderConfig
from harness.core.errors import CheckpointError, UserError
from pretrain.encoders.base import Encoder, create_encoder

#: The families of the table above (defined beside the suite schema, which validates them).
FAMILIES: tuple[str, ...] = CHECKPOINT_FORMATS
EXPORT_FORMATS: tuple[str, ...] = ("timm", "safetensors")
_CONTAINERS = ("state_dict", "model", "module", "model_state", "model_ema")


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport:
    """What an import did: the family, the target wrapper and config, and every key it did not
    load one-to-one (``dropped`` by reason, ``missing``, ``unexpected``) with the conversions;
    ``assumed``: every architecture value that was neither in the file nor named by the user."""

    source: str
    family: str
    detected: str | None
    container: str | None
    target: str = "vit"
    encoder: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)
    partial: bool = False
    sha256: str | None = None

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def arch_label(self) -> str:
        """The imported architecture as records name it (``beit:`` for the BEiT wrapper)."""
        from pretrain.encoders.arch import arch_label

        label = arch_label(EncoderConfig.model_validate(self.encoder))
        return f"beit:{label}" if self.target == "beit" else label

    def summary(self, limit: int = 20) -> dict[str, Any]:
        """JSON-compatible summary for records (key lists cut to ``limit``)."""
        d = asdict(self)
        for k in ("missing", "unexpected"):
            d[k] = d[k][:limit] + ([f"... {len(d[k]) - limit} more"] if len(d[k]) > limit else [])
        d["dropped"] = {r: (len(v), v[:5]) for r, v in self.dropped.items()}
        return d

    def format(self) -> str:
        """Human-readable lines (what ``mimbench import`` prints)."""
        lines = [
            f"{self.source}: family {self.family}"
            + (
                f" (detected {self.detected})"
                if self.detected and self.detected != self.family
                else ""
            )
            + (f", container '{self.container}'" if self.container else "")
            + f" -> {self.target} encoder {self.encoder.get('arch')} "
            f"(dim {self.encoder.get('embed_dim')}, depth {self.encoder.get('depth')}, heads "
            f"{self.encoder.get('num_heads')}, patch {self.encoder.get('patch_size')}, img "
            f"{self.encoder.get('img_size')}); {self.loaded} tensors loaded"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  ASSUMED (not in the file, not named): {a}" for a in self.assumed]
        for reason, keys in self.dropped.items():
            lines.append(
                f"  dropped {len(keys)} ({reason}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            )
        if self.missing:
            lines.append(
                f"  MISSING {len(self.missing)} (left at init): {', '.join(self.missing[:8])}"
            )
        if self.unexpected:
            lines.append(
                f"  UNEXPECTED {len(self.unexpected)} (ignored): {', '.join(self.unexpected[:8])}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def _safe_globals() -> list[Any]:
    """Harmless types found in public checkpoints besides tensors: MAE/BEiT/DINO pickle their
    ``args`` (an argparse Namespace); many store numpy scalars (``max_accuracy``) or arrays."""
    import numpy as np

    try:
        import numpy._core.multiarray as ma  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1
        import numpy.core.multiarray as ma  # type: ignore[no-redef]
    out: list[Any] = [
        argparse.Namespace,
        np.dtype,
        np.ndarray,
        ma.scalar,
        ma._reconstruct,
        (ma.scalar, "numpy.core.multiarray.scalar"),
        (ma._reconstruct, "numpy.core.multiarray._reconstruct"),
    ]
    for t in (
        np.float64,
        np.float32,
        np.float16,
        np.int64,
        np.int32,
        np.int16,
        np.int8,
        np.uint8,
        np.bool_,
    ):
        out.append(type(np.dtype(t)))
    return out


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def load_file_weights_only(path: str | Path) -> tuple[Any, dict[str, str] | None]:
    """Read a checkpoint without arbitrary unpickling: ``(object, safetensors metadata)``.

    Raises:
        CheckpointError: the file is missing, or it pickles an object that is not a tensor, a
            plain container or one of the harmless types above (the message names the type and
            how to strip the file down to its weights).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}: check the path")
    if _is_safetensors(path):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            return load_file(str(path)), meta
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True), None
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc) or "Unsupported operand" in str(exc):
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(exc) + "\n", re.S)
            raise CheckpointError(
                f"cannot read {path} weights-only: not a PyTorch or safetensors checkpoint, or a "
                f"damaged one ({detail.group(1).strip() if detail else str(exc).splitlines()[0]})"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a pickled '{found.group(1)}' object" if found else "pickled Python objects"
        raise CheckpointError(
            f"refusing to load {path}: it holds {what}, and unpickling that could run arbitrary "
            "code, so checkpoints are loaded weights-only (tensors, plain containers, numpy "
            "scalars, argparse Namespaces). If you trust the file, save its weights alone and "
            f"import that: python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c.get('model', c), '{path.with_suffix('.weights.pth')}')\""
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} weights-only ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a PyTorch or safetensors checkpoint?"
        ) from None


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap_state_dict(
    obj: Any, path: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str | None]:
    """``(state dict, mimbench meta or None, container key or None)`` of a loaded checkpoint.

    Looks under ``state_dict`` / ``model`` / ``module`` / ... and strips a DDP ``module.`` prefix.
    """
    meta = None
    container = None
    state: Any = obj
    if isinstance(obj, dict) and isinstance(obj.get("mimbench"), dict):
        meta = obj["mimbench"]
        state, container = obj.get("state_dict"), "state_dict"
    elif isinstance(obj, dict) and not _tensor_dict(obj):
        for key in _CONTAINERS:
            if isinstance(obj.get(key), dict):
                state, container = obj[key], key
                break
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not _tensor_dict(state):
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds no state dict of tensors (top-level keys: {keys}); expected the weights "
            f"at the top level or under one of {', '.join(_CONTAINERS)}"
        )
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, meta, container


def read_checkpoint(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str | None]:
    """Weights-only read of a checkpoint file: ``(state dict, mimbench meta, container)``.

    Safetensors files carry our meta in their metadata (``mimbench`` as JSON); a plain ``.pth``
    export carries it in the ``.json`` sidecar next to it; a pretraining ``checkpoint.pth`` gets
    :func:`pretrain_checkpoint_meta`.
    """
    path = Path(path)
    obj, st_meta = load_file_weights_only(path)
    state, meta, container = unwrap_state_dict(obj, str(path))
    if meta is None:
        meta = pretrain_checkpoint_meta(obj, path)
    if meta is None and st_meta and "mimbench" in st_meta:
        meta = json.loads(st_meta["mimbench"])
    if meta is None:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            try:
                side = json.loads(sidecar.read_text())
            except ValueError:
                side = None
            if isinstance(side, dict) and isinstance(side.get("mimbench"), dict):
                meta = side["mimbench"]
    return state, meta, container


#: ``format`` of the meta that :func:`pretrain_checkpoint_meta` gives a pretraining checkpoint.
PRETRAIN_CHECKPOINT_META = "mimbench-pretrain-checkpoint"
_STAGE_CONFIG = "config.yaml"  # beside checkpoint.pth in a pretraining stage directory


def _stage_config_encoder(path: Path, chash: Any) -> dict[str, Any] | None:
    """The encoder config of the ``config.yaml`` beside ``path`` if that config is the one the
    checkpoint was trained with (its hash, computed as the engine does, is ``chash``)."""
    import yaml

    from harness.core.fsutil import config_hash

    cfg_path = path.parent / _STAGE_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        plain = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(plain, dict) or not isinstance(plain.get("encoder"), dict):
        return None
    if config_hash({k: v for k, v in plain.items() if k not in ("output_dir", "name")}) != chash:
        return None
    return plain["encoder"]


def pretrain_checkpoint_meta(obj: Any, path: Path) -> dict[str, Any] | None:
    """Meta of one of our pretraining checkpoints (``checkpoint.pth``): its encoder config.

    The engine stores it in the checkpoint (``encoder_config``); for checkpoints written before
    it did, the ``config.yaml`` of the stage directory is used when its hash is the
    checkpoint's ``config_hash``. None for any other file, or when neither says.
    """
    if not (isinstance(obj, dict) and "config_hash" in obj and isinstance(obj.get("model"), dict)):
        return None
    enc, where = obj.get("encoder_config"), "the checkpoint's encoder_config"
    if not isinstance(enc, dict):
        enc = _stage_config_encoder(path, obj["config_hash"])
        where = f"{path.parent / _STAGE_CONFIG} (its config hash is the checkpoint's)"
    if enc is None:
        return None
    return {"format": PRETRAIN_CHECKPOINT_META, "encoder": enc, "recorded_in": where}


def _is_encoder_meta(meta: dict[str, Any] | None) -> bool:
    """Whether ``meta`` is a mimbench encoder file's (not a pretraining checkpoint's)."""
    return bool(meta) and meta.get("format") != PRETRAIN_CHECKPOINT_META  # type: ignore[union-attr]


# --------------------------------------------------------------------------- detection


def detect_family(
    state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None, container: str | None = None
) -> str | None:
    """The checkpoint family from its keys (None when nothing matches)."""
    if _is_encoder_meta(meta):
        return "mimbench"
    keys = list(state)

    def any_(pred: Any) -> bool:
        return any(pred(k) for k in keys)

    if any_(lambda k: k.startswith("backbone.")):
        return "mmpretrain"
    if any_(lambda k: k.startswith(("encoder.vit.", "encoder.swin."))):
        return "mimbench_ckpt"
    if any_(lambda k: k.startswith("encoder.")):
        return "simmim"
    if any_(lambda k: k.startswith("layers.") and ".blocks." in k):
        return "swin"
    if any_(
        lambda k: k.endswith((".gamma_1", "attn.q_bias")) or "relative_position_bias_table" in k
    ):
        return "beit"
    if "cls_token" in state and any_(lambda k: k.startswith("blocks.")):
        if any_(lambda k: k.startswith("decoder_")) or container == "model":
            return "mae"
        return "timm"
    return None


# --------------------------------------------------------------------------- key conversion


def _is_head_key(k: str) -> bool:
    return k.startswith(("head.", "head_dist.", "fc_norm.", "pre_logits."))


def _convert_vit_like(
    state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """timm-layout ViT keys -> our ViTEncoder's (timm) keys: drop heads, fold layer scale, add
    missing qkv biases; the mask token goes to ``report`` via the returned ``mask_token`` key."""
    out: dict[str, torch.Tensor] = {}
    gammas: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _is_head_key(k):
            report.drop("classifier head", k)
        elif re.match(r"blocks\.\d+\.ls[12]\.gamma$", k):
            gammas[k] = v
        elif k in ("mask_token",):
            out["__mask_token__"] = v
        else:
            out[k] = v
    for k, g in sorted(gammas.items()):
        i, which = re.match(r"blocks\.(\d+)\.ls([12])\.gamma$", k).groups()  # type: ignore[union-attr]
        lin = f"blocks.{i}.attn.proj" if which == "1" else f"blocks.{i}.mlp.fc2"
        if f"{lin}.weight" not in out:
            out[k] = g  # left for the 'unexpected' report
            continue
        out[f"{lin}.weight"] = out[f"{lin}.weight"] * g[:, None]
        if f"{lin}.bias" in out:
            out[f"{lin}.bias"] = out[f"{lin}.bias"] * g
    if gammas:
        report.notes.append(
            f"folded {len(gammas)} layer-scale vectors into attn.proj / mlp.fc2 (exact)"
        )
    added = 0
    for k in list(out):
        m = re.match(r"(blocks\.\d+\.attn\.qkv)\.weight$", k)
        if m and f"{m.group(1)}.bias" not in out:
            out[f"{m.group(1)}.bias"] = torch.zeros(out[k].shape[0], dtype=out[k].dtype)
            added += 1
    if added:
        report.notes.append(f"qkv had no bias in {added} blocks: zeros inserted (exact)")
    return out


def _convert_beit_like(
    state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """BEiT-layout keys (BEiT, SimMIM's ViT) -> timm Beit keys: drop heads and index buffers."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _is_head_key(k) or k.startswith("lm_head."):
            report.drop("classifier / token-prediction head", k)
        elif k.endswith("relative_position_index"):
            report.drop("index buffer (rebuilt)", k)
        elif k == "mask_token":
            out["__mask_token__"] = v
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


def _convert_mmpretrain(
    state: dict[str, torch.Tensor], report: ImportReport
) -> tuple[str, dict[str, torch.Tensor]]:
    """mmpretrain ``backbone.`` keys -> timm ViT or Beit keys: ``(target, state)``."""
    inner: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            inner[k.removeprefix("backbone.")] = v
        else:
            report.drop("not the backbone (neck / head / preprocessor)", k)
    if any(k.startswith("stages.") for k in inner):
        return "swin", _convert_mmpretrain_swin(inner, report)
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
    beit = any(
        k.endswith((".gamma_1", "attn.q_bias")) or "relative_position_bias_table" in k
        for k in renamed
    )
    if beit:
        return "beit", _convert_beit_like(renamed, report)
    return "vit", _convert_vit_like(renamed, report)


def _convert_mmpretrain_swin(
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
    from downstream.swin_keys import mm_to_timm_swin

    st = {k: v for k, v in inner.items() if k != "mask_token"}
    out, dropped, unknown = mm_to_timm_swin(st)
    for reason, keys in dropped.items():
        for k in keys:
            report.drop(reason, f"backbone.{k}")
    for k in unknown:
        out[f"backbone.{k}"] = inner[k]
    if "mask_token" in inner:  # mmpretrain's SimMIMSwinTransformer
        out["__mask_token__"] = inner["mask_token"]
    report.notes.append(
        "mmpretrain Swin: patch merging moved to the start of the next stage and its channels "
        "reordered from nn.Unfold's to timm's order (exact)"
    )
    return out


def convert_state(
    state: dict[str, torch.Tensor],
    family: str,
    report: ImportReport,
    meta: dict[str, Any] | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Keys of ``family`` -> ``(target wrapper, its timm keys)``; the mask token (when the
    checkpoint has an encoder-side one) is under ``__mask_token__``."""
    if family == "mimbench":
        target = str((meta or {}).get("family", "vit"))
        st = dict(state)
        return target, st
    if family == "mimbench_ckpt":
        st = {}
        target = "vit"
        for k, v in state.items():
            if k.startswith("encoder.vit."):
                st[k.removeprefix("encoder.vit.")] = v
            elif k.startswith("encoder.swin."):
                st[k.removeprefix("encoder.swin.")] = v
                target = "swin"
            elif k == "encoder.mask_token":
                st["__mask_token__"] = v
            else:
                report.drop("pretraining head / decoder", k)
        return target, st
    if family in ("timm", "mae"):
        st = {}
        for k, v in state.items():
            if k.startswith(("decoder_", "decoder.")):
                report.drop("MAE decoder", k)
            elif family == "mae" and k == "mask_token":
                report.drop("MAE decoder's mask token", k)
            else:
                st[k] = v
        return "vit", _convert_vit_like(st, report)
    if family == "beit":
        return "beit", _convert_beit_like(state, report)
    if family == "simmim":
        st = {}
        for k, v in state.items():
            if k.startswith("encoder."):
                st[k.removeprefix("encoder.")] = v
            else:
                report.drop("SimMIM decoder", k)
        if any(k.startswith("layers.") for k in st):
            return "swin", _convert_swin(st, report)
        return "beit", _convert_beit_like(st, report)
    if family == "mmpretrain":
        return _convert_mmpretrain(state, report)
    if family == "swin":
        return "swin", _convert_swin(state, report)
    raise CheckpointError(f"unknown checkpoint format '{family}'; known: {', '.join(FAMILIES)}")


def _convert_swin(state: dict[str, torch.Tensor], report: ImportReport) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if _is_head_key(k):
            report.drop("classifier head", k)
        elif k == "mask_token":
            out["__mask_token__"] = v
        else:
            out[k] = v  # layout differences (downsample placement, buffers) are timm's filter's job
    return out


# --------------------------------------------------------------------------- configs


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


def _nearest_vit_preset(dim: int, depth: int, patch: int) -> str:
    vits = {n: p for n, p in ENCODER_PRESETS.items() if p.get("family", "vit") == "vit"}
    for n, p in vits.items():
        if (p["embed_dim"], p["depth"], p["patch_size"]) == (dim, depth, patch):
            return n
    return min(vits, key=lambda n: (abs(vits[n]["embed_dim"] - dim), abs(vits[n]["depth"] - depth)))


def _vit_shape(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
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
        n = int(state["pos_embed"].shape[1]) - 1
        g = math.isqrt(n)
        grid = g if g * g == n else None
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


def _target_vit_config(
    state: dict[str, torch.Tensor], cfg: EncoderConfig | None, report: ImportReport
) -> EncoderConfig:
    s = _vit_shape(state, report.source)
    if cfg is not None:
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
        arch=_nearest_vit_preset(s["embed_dim"], s["depth"], s["patch_size"]),
        img_size=s["grid"] * s["patch_size"],
        patch_size=s["patch_size"],
        embed_dim=s["embed_dim"],
        depth=s["depth"],
        num_heads=heads,
        mlp_ratio=s["mlp_ratio"],
        pos_embed="learned",
    )


def _swin_shape(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
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
    state: dict[str, torch.Tensor], cfg: EncoderConfig | None, report: ImportReport
) -> EncoderConfig:
    s = _swin_shape(state, report.source)
    presets = [
        n
        for n, p in ENCODER_PRESETS.items()
        if p.get("family") == "swin"
        and tuple(p["stage_depths"]) == s["stage_depths"]
        and tuple(p["stage_heads"]) == s["stage_heads"]
        and p["window_size"] == s["window_size"]
    ]
    if cfg is not None:
        if cfg.family != "swin" or cfg.arch not in presets:
            raise CheckpointError(
                f"{report.source} is a Swin with stages {s['stage_depths']}, heads {s['stage_heads']}, "
                f"window {s['window_size']}; encoder '{cfg.arch}' does not match"
                + (f": use one of {presets}" if presets else "")
            )
        return cfg
    if not presets:
        raise CheckpointError(
            f"{report.source} is a Swin with stages {s['stage_depths']}, heads {s['stage_heads']} and "
            f"window {s['window_size']}: no Swin preset in ENCODER_PRESETS has that shape (the wrapper "
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


# --------------------------------------------------------------------------- loading


def _resize_to(
    enc: nn.Module, target: str, state: dict[str, torch.Tensor], report: ImportReport
) -> dict[str, torch.Tensor]:
    """Resize position embeddings / relative position tables to the encoder's grid."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    own = enc.timm_state_dict()  # type: ignore[operator]
    grid = tuple(enc.grid_size)  # type: ignore[attr-defined]
    out = dict(state)
    pe = out.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        old = math.isqrt(pe.shape[1] - 1)
        out["pos_embed"] = resample_abs_pos_embed(
            pe.float(), new_size=list(grid), num_prefix_tokens=1
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


def _recorded_config(
    report: ImportReport, target: str, meta: dict[str, Any] | None
) -> EncoderConfig | None:
    """The encoder config our own file records (encoder file or pretraining checkpoint)."""
    if report.family not in ("mimbench", "mimbench_ckpt") or not meta:
        return None
    if report.family == "mimbench" and not _is_encoder_meta(meta):
        return None
    if not isinstance(meta.get("encoder"), dict):
        raise CheckpointError(
            f"{report.source}: its mimbench metadata holds no encoder config; re-export it, or "
            "import its weights with --format timm and --arch"
        )
    rec = EncoderConfig.model_validate(meta["encoder"])
    wrapper = "vit" if target == "beit" else target
    if rec.family != wrapper:
        raise CheckpointError(
            f"{report.source}: its metadata records a {rec.family} encoder ({rec.arch}) but its "
            f"weights are a {target} encoder's: the file is inconsistent; re-export it"
        )
    return rec


def _fit_recorded(
    rec: EncoderConfig, cfg: EncoderConfig | None, report: ImportReport, meta: dict[str, Any]
) -> EncoderConfig:
    """The recorded config, checked against the named one (which may change the resolution)."""
    from pretrain.encoders.arch import arch_label, check_architecture

    where = meta.get("recorded_in", "the file's mimbench metadata")
    if cfg is None:
        report.notes.append(f"architecture {arch_label(rec)} from {where}")
        return rec
    check_architecture(cfg, rec, report.source)
    report.notes.append(f"architecture {arch_label(rec)} from {where}, as named")
    if cfg.img_size != rec.img_size:
        rec = EncoderConfig.model_validate({**rec.model_dump(), "img_size": cfg.img_size})
    return rec


def import_state_dict(
    state: dict[str, torch.Tensor],
    report: ImportReport,
    cfg: EncoderConfig | None = None,
    meta: dict[str, Any] | None = None,
    allow_partial: bool = False,
    img_size: int | None = None,
) -> Encoder:
    """Convert ``state`` (of ``report.family``) and load it into a new encoder wrapper
    (``img_size``: the target resolution when no ``cfg`` is given)."""
    target, st = convert_state(state, report.family, report, meta)
    report.target = target
    mask_token = st.pop("__mask_token__", None)
    recorded = _recorded_config(report, target, meta)
    if recorded is not None:
        enc_cfg = _fit_recorded(recorded, cfg, report, meta or {})
        options = dict((meta or {}).get(f"{target}_options") or {})  # Encoder.file_meta's key
    elif target == "swin":
        enc_cfg = _target_swin_config(st, cfg, report)
        options = {}
    else:
        enc_cfg = _target_vit_config(st, cfg, report)
        options = beit_options_from_keys(st) if target == "beit" else {}
    if img_size is not None and cfg is None and img_size != enc_cfg.img_size:
        enc_cfg = EncoderConfig.model_validate({**enc_cfg.model_dump(), "img_size": img_size})
    if cfg is not None and cfg.drop_path_rate != enc_cfg.drop_path_rate:
        enc_cfg = enc_cfg.model_copy(update={"drop_path_rate": cfg.drop_path_rate})
    enc = create_encoder(enc_cfg, target, options)
    report.encoder = enc_cfg.model_dump(mode="json")
    report.options = options
    if target == "swin":
        from timm.models.swin_transformer import checkpoint_filter_fn

        buffers = [k for k in st if "relative_position_index" in k or "attn_mask" in k]
        for k in buffers:
            report.drop("index / mask buffer (rebuilt)", k)
        st = checkpoint_filter_fn(st, enc.swin)  # type: ignore[attr-defined]
    else:
        st = _resize_to(enc, target, st, report)
    own = enc.timm_state_dict()  # type: ignore[operator]
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
    sd = {k: v for k, v in st.items() if k in own}
    enc.trunk.load_state_dict(sd, strict=not report.partial)
    report.loaded = len(sd)
    if mask_token is not None:
        if tuple(mask_token.shape) == tuple(enc.mask_token.shape):  # type: ignore[union-attr]
            with torch.no_grad():
                enc.mask_token.copy_(mask_token)  # type: ignore[union-attr, operator]
            report.notes.append("encoder mask token loaded")
        else:
            report.drop("mask token of another width", "mask_token")
    return enc


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
        fmt: One of :data:`FAMILIES`, or ``auto`` to detect it from the keys.
        allow_partial: Load what matches when keys are missing or unused (listed in the report).
        img_size: Target resolution when ``cfg`` is not given (position embeddings are resized).

    Returns:
        ``(encoder, report)``.
    """
    from harness.core.fsutil import sha256_file

    path = Path(path)
    state, meta, container = read_checkpoint(path)
    detected = detect_family(state, meta, container)
    if fmt == "auto":
        if detected is None:
            raise CheckpointError(
                f"cannot tell the format of {path} from its keys (first: {', '.join(list(state)[:6])}); "
                f"pass --format, one of: {', '.join(FAMILIES)}"
            )
        family = detected
    elif fmt not in FAMILIES:
        from harness.core.registry import did_you_mean

        raise CheckpointError(
            f"unknown --format '{fmt}';{did_you_mean(fmt, list(FAMILIES))} known: {', '.join(FAMILIES)}"
        )
    else:
        family = fmt
    if family == "mimbench" and not _is_encoder_meta(meta):
        raise CheckpointError(
            f"{path} has no mimbench metadata: use another --format (detected {detected})"
        )
    report = ImportReport(
        source=str(path),
        family=family,
        detected=detected,
        container=container,
        sha256=sha256_file(path),
    )
    enc = import_state_dict(state, report, cfg, meta, allow_partial, img_size)
    return enc, report


def _source_files(src: str | Path) -> list[Path]:
    """A checkpoint file and the ``.json`` sidecar that may carry its metadata."""
    path = Path(src)
    return [path, path.with_suffix(".json")] if path.suffix != ".json" else [path]


def guard_outputs(outputs: list[Path], sources: list[Path], overwrite: bool = False) -> None:
    """Refuse to write over a file being read, or over an existing file unless ``overwrite``.

    Args:
        outputs: The files a command is about to write.
        sources: The files it reads (never replaced, even with ``overwrite``).
        overwrite: Whether existing outputs may be replaced (``--overwrite``).

    Raises:
        UserError: naming the file and the fix; nothing has been written.
    """
    srcs = [p for p in sources if p.exists()]
    for out in outputs:
        for src in srcs:
            if out.exists() and os.path.samefile(out, src):
                raise UserError(
                    f"--out would write {out}, which is {src}, a file this command reads: it "
                    "would be replaced; choose another --out"
                )
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass "
            "--overwrite to replace it, or choose another --out"
        )


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
    guard_outputs([Path(dst)], _source_files(src), overwrite)
    enc, report = load_checkpoint(src, cfg, fmt, allow_partial, img_size)
    enc.save_timm(dst, meta={"imported": report.summary()})  # type: ignore[operator]
    return report


def encoder_from_timm_name(name: str) -> tuple[Encoder, ImportReport]:
    """A randomly initialized encoder with the architecture of timm model ``name``.

    Nothing is downloaded: timm builds the model with ``pretrained=False`` (seed torch first for
    a reproducible init) and its state dict is imported like a checkpoint, so ViT variants with
    layer scale or without qkv bias map exactly onto our wrapper and BEiTs onto the BEiT one.
    """
    import timm
    from timm.models.beit import Beit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if not timm.is_model(name):
        from harness.core.registry import did_you_mean

        raise CheckpointError(
            f"'{name}' is neither a file nor a timm model name;{did_you_mean(name, timm.list_models())} "
            "give a checkpoint path, random:<preset>, or a timm model name"
        )
    is_beit = timm.models.model_entrypoint(name).__module__.endswith(".beit")
    # BEiT: keep the final norm on the tokens (its 'avg' pooling would move it after pooling)
    model = timm.create_model(
        name, pretrained=False, num_classes=0, **({"global_pool": "token"} if is_beit else {})
    )
    report = ImportReport(source=f"timm:{name}", family="timm", detected="timm", container=None)
    state = {k: v for k, v in model.state_dict().items()}
    if isinstance(model, Beit):
        report.family = "beit"
        cfg = EncoderConfig(
            arch=_nearest_vit_preset(
                model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0]
            ),
            img_size=model.patch_embed.img_size[0],
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=model.blocks[0].attn.num_heads,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
            pos_embed="learned",
        )
    elif isinstance(model, VisionTransformer):
        if (
            model.num_prefix_tokens != 1
            or model.cls_token is None
            or getattr(model, "no_embed_class", False)
        ):
            raise CheckpointError(
                f"timm model '{name}' has {model.num_prefix_tokens} prefix tokens / no class token "
                "with position: the ViT wrapper needs exactly one class token with its own position"
            )
        cfg = EncoderConfig(
            arch=_nearest_vit_preset(
                model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0]
            ),
            img_size=model.patch_embed.img_size[0],
            patch_size=model.patch_embed.patch_size[0],
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=model.blocks[0].attn.num_heads,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
            pos_embed="learned",
        )
    elif isinstance(model, SwinTransformer):
        report.family = "swin"
        cfg = None
    else:
        raise CheckpointError(
            f"timm model '{name}' is a {type(model).__name__}; the encoder wrappers cover timm's "
            "VisionTransformer, Beit and (preset shapes of) SwinTransformer"
        )
    enc = import_state_dict(state, report, cfg)
    return enc, report


# --------------------------------------------------------------------------- export


def export_paths(out: str | Path, formats: tuple[str, ...] = EXPORT_FORMATS) -> list[Path]:
    """The files :func:`export_encoder` writes for ``out`` (a ``.pth``/``.safetensors`` suffix
    is stripped): ``.pth`` (timm), ``.safetensors``, then the ``.json`` sidecar."""
    out = Path(out)
    if out.suffix in (".pth", ".pt", ".safetensors"):
        out = out.with_suffix("")
    paths = [out.with_suffix(".pth")] if "timm" in formats else []
    if "safetensors" in formats:
        paths.append(out.with_suffix(".safetensors"))
    return [*paths, out.with_suffix(".json")]


def export_encoder(
    encoder: Encoder,
    out: str | Path,
    formats: tuple[str, ...] = EXPORT_FORMATS,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    sources: tuple[str | Path, ...] = (),
) -> list[Path]:
    """Write ``encoder`` as ``<out>.pth`` (a plain timm state dict), ``<out>.safetensors`` (with
    the timm architecture and our meta in its metadata) and ``<out>.json`` (the architecture).

    Every file is serialized before any is written; each is written atomically, and a failure
    part-way removes the files this call created.

    Args:
        encoder: An encoder of any family.
        out: Output path without suffix (a suffix ``.pth`` / ``.safetensors`` is stripped).
        formats: Any of ``timm`` and ``safetensors``.
        extra_meta: Added to the meta (e.g. where the weights came from).
        overwrite: Replace existing files (else an existing output is an error).
        sources: Files the encoder was read from: never written over.

    Returns:
        The files written.
    """
    import io

    from safetensors.torch import save as st_save

    from harness.core.fsutil import atomic_write_bytes

    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise CheckpointError(
            f"unknown export format(s) {sorted(unknown)}; use {', '.join(EXPORT_FORMATS)}"
        )
    paths = export_paths(out, formats)
    guard_outputs(paths, [p for s in sources for p in _source_files(s)], overwrite)
    meta = encoder.file_meta(extra_meta)
    state = {k: v.contiguous() for k, v in encoder.timm_state_dict().items()}  # type: ignore[operator]
    name, kwargs = meta["timm_name"], meta["timm_kwargs"]
    blobs: dict[str, bytes] = {}
    if "timm" in formats:
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs[".pth"] = buf.getvalue()
    if "safetensors" in formats:
        blobs[".safetensors"] = st_save(
            state,
            metadata={
                "format": "pt",
                "mimbench": json.dumps(meta),
                "timm_name": name,
                "timm_kwargs": json.dumps(kwargs),
            },
        )
    load = (
        f"timm.create_model('{name}', pretrained=False, checkpoint_path='<file>', "
        + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        + ")"
    )
    sidecar = {"timm_name": name, "timm_kwargs": kwargs, "load_with": load, "mimbench": meta}
    blobs[".json"] = (
        json.dumps(sidecar, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    ).encode("utf-8")
    created: list[Path] = []
    try:
        for path in paths:
            new = not path.exists()
            atomic_write_bytes(path, blobs[path.suffix])
            if new:
                created.append(path)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return paths
