"""Reading a checkpoint file weights-only and finding its state dict and our metadata.

Nothing here knows a checkpoint format: a file is read (``torch.load(weights_only=True)`` or
safetensors), the state dict is found inside its container, and the metadata our own files carry
(encoder files, their ``.json`` sidecars and safetensors metadata, pretraining ``checkpoint.pth``)
is returned beside it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from harness.core.errors import CheckpointError
from harness.core.fsutil import pretrain_config_hash

try:
    import numpy._core.multiarray as ma  # numpy 2
except ImportError:  # pragma: no cover - numpy 1
    import numpy.core.multiarray as ma  # type: ignore[no-redef]

#: Where checkpoints keep the weights, tried in order; the EMA teachers that iBOT
#: (``teacher``) and I-JEPA (``target_encoder``) evaluate are taken over their students.
_CONTAINERS = (
    "state_dict", "model", "module", "model_state", "model_ema", "teacher", "target_encoder",
)  # fmt: skip


def _safe_globals() -> list[Any]:
    """Harmless types found in public checkpoints besides tensors: MAE/BEiT/DINO pickle their
    ``args`` (an argparse Namespace); many store numpy scalars (``max_accuracy``) or arrays."""
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
    cfg_path = path.parent / _STAGE_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        plain = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(plain, dict) or not isinstance(plain.get("encoder"), dict):
        return None
    if pretrain_config_hash(plain) != chash:
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


def is_encoder_meta(meta: dict[str, Any] | None) -> bool:
    """Whether ``meta`` is a mimbench encoder file's (not a pretraining checkpoint's)."""
    return bool(meta) and meta.get("format") != PRETRAIN_CHECKPOINT_META  # type: ignore[union-attr]

