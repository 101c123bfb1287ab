"""Export: an encoder as a plain timm state dict (``.pth``), ``.safetensors`` (with the timm
architecture in its metadata) and a JSON sidecar naming the timm architecture, so that
``timm.create_model(name, checkpoint_path=file, **kwargs)`` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from downstream.checkpoints.files import guard_outputs
from downstream.checkpoints.files import source_files as _source_files
from harness.core.errors import CheckpointError

EXPORT_FORMATS: tuple[str, ...] = ("timm", "safetensors")


def timm_architecture(encoder: nn.Module) -> tuple[str, dict[str, Any]]:
    """``(timm model name, kwargs)`` that rebuild the encoder's architecture in timm."""
    if hasattr(encoder, "beit"):
        from downstream.beit_encoder import BEIT_TIMM_NAME

        return BEIT_TIMM_NAME, dict(encoder.timm_kwargs)  # type: ignore[attr-defined]
    cfg = encoder.cfg  # type: ignore[attr-defined]
    return cfg.timm_name, dict(cfg.timm_kwargs())


def _encoder_meta(encoder: nn.Module) -> dict[str, Any]:
    name, kwargs = timm_architecture(encoder)
    meta: dict[str, Any] = {
        "format": "mimbench-encoder",
        "version": 1,
        "family": "beit" if hasattr(encoder, "beit") else encoder.cfg.family,  # type: ignore[attr-defined]
        "encoder": encoder.cfg.model_dump(mode="json"),  # type: ignore[attr-defined]
        "timm_name": name,
        "timm_kwargs": kwargs,
    }
    if hasattr(encoder, "beit"):
        meta["beit_options"] = dict(encoder.options)  # type: ignore[attr-defined]
    return meta


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
    encoder: nn.Module,
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
        encoder: A ViTEncoder, BeitEncoder or SwinEncoder.
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
    meta = {**_encoder_meta(encoder), **(extra_meta or {})}
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
