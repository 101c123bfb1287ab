"""The encoder wrapper every recipe and every downstream protocol uses.

A thin layer over timm's :class:`~timm.models.vision_transformer.VisionTransformer` (Dosovitskiy
et al., ICLR 2021) that adds what masked image modeling needs:

* ``forward_features(x, mask)``: the full token sequence, with a learned mask token replacing
  the embeddings of masked patches (SimMIM, BEiT);
* ``forward_visible(x, ids_keep)``: the encoder on visible tokens only (MAE);
* ``forward_intermediates``: per-block feature maps for dense heads;
* ``layer_id``: the layer-wise lr decay group of each parameter;
* fixed 2-D sin-cos position embeddings (MAE) or learned ones.

The timm model lives in ``self.vit``; its state dict keeps timm's key names, so an exported
encoder loads with ``timm.create_model(name, num_classes=0, checkpoint_path=...)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from harness.core.config import ENCODER_PRESETS, EncoderConfig
from harness.core.errors import CheckpointError


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """2-D sin-cos position embedding (MAE, after the Transformer's 1-D one).

    Half of the channels encode the row, half the column; each half is ``[sin, cos]`` of the
    coordinate times ``1 / 10000^(2i/d)``.

    Returns:
        Array ``[grid_h * grid_w, embed_dim]``, row-major over the grid.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    ys, xs = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def _1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)  # [M, dim/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's convention: the first half encodes w (x), the second h (y).
    return np.concatenate([_1d(embed_dim // 2, xs), _1d(embed_dim // 2, ys)], axis=1).astype(np.float32)


#: The shape fields of an :class:`EncoderConfig` (with the family and, for Swin, the preset's
#: stages and window): two configs that agree on them build the same network.
ARCH_FIELDS: tuple[str, ...] = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def architecture(cfg: EncoderConfig) -> dict[str, Any]:
    """The architecture ``cfg`` builds: family, shape fields and (Swin) stages and window."""
    out: dict[str, Any] = {"family": cfg.family}
    out.update({k: getattr(cfg, k) for k in ARCH_FIELDS})
    if cfg.family == "swin":
        preset = ENCODER_PRESETS[cfg.arch]
        out.update(
            stage_depths=tuple(preset["stage_depths"]),
            stage_heads=tuple(preset["stage_heads"]),
            window_size=preset["window_size"],
        )
    return out


def arch_label(cfg: EncoderConfig) -> str:
    """What a record calls the architecture: the preset, plus every value that differs from it.

    ``vit_tiny_32`` for the preset itself, ``vit_tiny_32(num_heads=2, img_size=48)`` otherwise.
    """
    preset = ENCODER_PRESETS[cfg.arch]
    diffs = [
        f"{k}={getattr(cfg, k)}"
        for k in (*ARCH_FIELDS, "img_size")
        if k in preset and getattr(cfg, k) != preset[k]
    ]
    return f"{cfg.arch}({', '.join(diffs)})" if diffs else cfg.arch


def check_architecture(
    named: EncoderConfig, recorded: EncoderConfig, source: str, img_size: bool = False
) -> None:
    """Refuse a checkpoint whose recorded architecture is not the one the user named.

    Args:
        named: The encoder config the user gave (``--arch``, a suite's ``encoder:``).
        recorded: The config the checkpoint's metadata holds (what it was trained as).
        source: The checkpoint, for the message.
        img_size: Also require the same image size (loaders that cannot resize).

    Raises:
        CheckpointError: naming every differing value of both.
    """
    a, b = architecture(named), architecture(recorded)
    fields = list(a) + (["img_size"] if img_size else [])
    a["img_size"], b["img_size"] = named.img_size, recorded.img_size
    bad = [f"{k}: checkpoint {b[k]} vs named {a[k]}" for k in fields if not _same(a[k], b[k])]
    if bad:
        raise CheckpointError(
            f"{source} holds a {arch_label(recorded)} encoder (its metadata), not the named "
            f"{arch_label(named)}: " + "; ".join(bad) + ". Fix: drop --arch (or the suite "
            "entry's 'encoder:') to use the architecture the file records, or name that one"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b))
    return bool(a == b)


class ViTEncoder(nn.Module):
    """A timm ViT with mask-token and visible-only forwards.

    Args:
        cfg: Encoder config (preset plus overrides).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = timm.create_model(
            cfg.timm_name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs()
        )
        self.patch_size: int = int(cfg.patch_size)  # type: ignore[arg-type]
        self.embed_dim: int = int(cfg.embed_dim)  # type: ignore[arg-type]
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        if self.num_prefix_tokens != 1 or self.vit.no_embed_class:
            raise ValueError("ViTEncoder expects one class token with its own position embedding")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        if cfg.pos_embed == "sincos":
            pe = sincos_pos_embed_2d(self.embed_dim, *self.grid_size)
            with torch.no_grad():
                self.vit.pos_embed.zero_()  # class token position: zeros, as in MAE
                self.vit.pos_embed[0, 1:].copy_(torch.from_numpy(pe))
            self.vit.pos_embed.requires_grad_(False)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.vit.blocks)

    # The output side of the encoder contract that prediction heads read (same names on
    # SwinEncoder and the Context Encoder's ConvEncoder).
    @property
    def encoder_stride(self) -> int:
        """Pixels per output token (the patch size for a ViT)."""
        return self.patch_size

    @property
    def num_features(self) -> int:
        """Width of the output tokens."""
        return self.embed_dim

    @property
    def feature_grid(self) -> tuple[int, int]:
        """Grid of the output tokens after the prefix tokens."""
        return self.grid_size

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings only, ``[B, C, H, W] -> [B, L, D]`` (before mask token and position)."""
        self._check_input(x)
        return self.vit.patch_embed(x)

    def forward_tokens(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_features` from given patch embeddings ``[B, L, D]`` (e.g. corrupted
        ones, ViT's masked patch prediction): mask token, positions, class token, blocks, norm."""
        if mask is not None:
            w = mask.unsqueeze(-1).to(t.dtype)  # [B, L, 1]
            t = t * (1.0 - w) + self.mask_token.to(t.dtype) * w
        t = t + self.vit.pos_embed[:, 1:, :]
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1, :]).expand(t.shape[0], -1, -1)
        t = self.vit.norm_pre(torch.cat([cls, t], dim=1))  # [B, 1 + L, D]
        return self.vit.norm(self.vit.blocks(t))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (besides biases and norms)."""
        return {"vit.pos_embed", "vit.cls_token", "mask_token"}

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay group of a parameter: 0 = embeddings, i+1 = block i, L+1 = top."""
        name = name.removeprefix("encoder.")
        if name.startswith(("vit.cls_token", "vit.pos_embed", "vit.patch_embed", "mask_token")):
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ helpers
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, L, p*p*C]`` (row-major patches, channels last inside a patch)."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("bchpwq->bhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, channels: int = 3) -> torch.Tensor:
        """``[B, L, p*p*C] -> [B, C, H, W]``, the inverse of :meth:`patchify`."""
        p = self.patch_size
        gh, gw = self.grid_size
        b = x.shape[0]
        x = x.reshape(b, gh, gw, p, p, channels)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(b, channels, gh * p, gw * p)

    def _check_input(self, x: torch.Tensor) -> None:
        exp = self.vit.patch_embed.img_size
        if tuple(x.shape[-2:]) != tuple(exp):
            raise ValueError(
                f"encoder expects {exp[0]}x{exp[1]} images, got {x.shape[-2]}x{x.shape[-1]}: "
                "set the data transform to the encoder's img_size (or encoder.img_size)"
            )

    # ------------------------------------------------------------------ forwards
    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, class token and position embedding.

        Args:
            x: Images ``[B, C, H, W]``.
            mask: Optional boolean ``[B, L]``, True where the patch is masked.

        Returns:
            Tokens ``[B, 1 + L, D]``.
        """
        self._check_input(x)
        t = self.vit.patch_embed(x)  # [B, L, D]
        if mask is not None:
            w = mask.unsqueeze(-1).to(t.dtype)  # [B, L, 1]
            t = t * (1.0 - w) + self.mask_token.to(t.dtype) * w
        t = t + self.vit.pos_embed[:, 1:, :]
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1, :]).expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1)  # [B, 1 + L, D]

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + L, D]``; masked patches see the mask token."""
        t = self.embed(x, mask)
        t = self.vit.norm_pre(t)
        t = self.vit.blocks(t)
        return self.vit.norm(t)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible patches only (MAE).

        Args:
            x: Images ``[B, C, H, W]``.
            ids_keep: Indices of visible patches ``[B, K]`` (same K for every sample).

        Returns:
            ``[B, 1 + K, D]``: class token then the visible tokens in ``ids_keep`` order.
        """
        t = self.embed(x)  # [B, 1 + L, D]
        cls, t = t[:, :1], t[:, 1:]
        t = torch.gather(t, 1, ids_keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # [B, K, D]
        t = torch.cat([cls, t], dim=1)
        t = self.vit.norm_pre(t)
        t = self.vit.blocks(t)
        return self.vit.norm(t)

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int], norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps ``[B, D, H/p, W/p]`` after the blocks in ``indices`` (0-based)."""
        t = self.vit.norm_pre(self.embed(x))
        outs: list[torch.Tensor] = []
        gh, gw = self.grid_size
        for i, blk in enumerate(self.vit.blocks):
            t = blk(t)
            if i in indices:
                y = self.vit.norm(t) if norm else t
                outs.append(y[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw))
        return outs

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """``cls``: the class token; ``avg``: mean of the patch tokens. ``[B, N, D] -> [B, D]``."""
        if pooling == "cls":
            return tokens[:, 0]
        if pooling == "avg":
            return tokens[:, 1:].mean(dim=1)
        raise ValueError(f"unknown pooling '{pooling}': use 'cls' or 'avg'")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, mask)

    # ------------------------------------------------------------------ checkpoints
    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The ViT's weights under timm's key names (no mask token, no head)."""
        return {k: v.detach().cpu().clone() for k, v in self.vit.state_dict().items()}

    def save_timm(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{'state_dict': timm keys, 'mimbench': meta}`` atomically.

        ``timm.create_model(self.cfg.timm_name, num_classes=0, checkpoint_path=path, **kw)``
        loads it (timm reads the ``state_dict`` entry). Only tensors and plain types are stored.
        """
        from harness.core.fsutil import atomic_torch_save

        payload = {
            "state_dict": self.timm_state_dict(),
            "mimbench": {
                "format": "mimbench-encoder",
                "version": 1,
                "encoder": self.cfg.model_dump(mode="json"),
                "timm_name": self.cfg.timm_name,
                "timm_kwargs": self.cfg.timm_kwargs(),
                **(meta or {}),
            },
        }
        atomic_torch_save(payload, path)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load timm-keyed weights strictly; a mismatch raises naming the keys and the fix."""
        own = self.vit.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shape_bad = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs encoder {tuple(own[k].shape)}"
            for k in set(own) & set(state_dict)
            if tuple(own[k].shape) != tuple(state_dict[k].shape)
        )
        if missing or unexpected or shape_bad:
            parts = []
            if shape_bad:
                parts.append("shape mismatches: " + "; ".join(shape_bad[:5]))
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
            raise CheckpointError(
                f"checkpoint {source} does not fit encoder '{self.cfg.arch}' "
                f"(embed_dim={self.embed_dim}, depth={self.num_layers}, patch={self.patch_size}, "
                f"img={self.cfg.img_size}): " + " | ".join(parts)
                + ". Fix: set the suite's encoder to the architecture the checkpoint was trained with."
            )
        self.vit.load_state_dict(state_dict, strict=True)


def _read_encoder_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state dict, mimbench meta or None)`` of an encoder file, read weights-only."""
    if not path.is_file():
        raise CheckpointError(f"encoder checkpoint not found: {path}: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise CheckpointError(
            f"cannot load {path} weights-only ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "only checkpoints holding tensors and plain types are accepted"
        ) from None
    meta = obj.get("mimbench") if isinstance(obj, dict) else None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return state, meta if isinstance(meta, dict) else None


def _file_config(
    path: Path, meta: dict[str, Any] | None, cfg: EncoderConfig | None
) -> EncoderConfig:
    """The config to build: the file's recorded one, checked against ``cfg`` when both exist.

    A file without metadata needs ``cfg`` (its number of heads is not in the weights).
    """
    if not meta or not isinstance(meta.get("encoder"), dict):
        if cfg is None:
            raise CheckpointError(
                f"{path} is not a mimbench encoder file (no 'mimbench' metadata), so its "
                "architecture is unknown (the number of heads is not in the weights): give the "
                "encoder config it was trained with (a suite's 'encoder: {arch: ...}' or --arch)"
            )
        return cfg
    recorded = EncoderConfig.model_validate(meta["encoder"])
    if cfg is not None:
        check_architecture(cfg, recorded, str(path), img_size=True)
    return recorded


def load_encoder_checkpoint(path: str | Path, cfg: EncoderConfig | None = None) -> ViTEncoder:
    """Build an encoder from a mimbench encoder file (or a plain timm state dict with ``cfg``).

    The architecture is the file's own (its metadata); a given ``cfg`` must name the same one
    (every shape field and the image size), or the load is refused naming both. Files are
    loaded weights-only: a checkpoint that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    state, meta = _read_encoder_file(path)
    enc = ViTEncoder(_file_config(path, meta, cfg))
    enc.load_timm_state_dict(state, str(path))
    return enc


def count_parameters(module: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


def create_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder wrapper of ``cfg.family``: :class:`ViTEncoder`, :class:`pretrain.swin.SwinEncoder`
    or the Context Encoder's :class:`pretrain.context_encoder.ConvEncoder`."""
    if cfg.family == "swin":
        from pretrain.swin import SwinEncoder

        return SwinEncoder(cfg)
    if cfg.family == "conv":
        from pretrain.context_encoder import ConvEncoder

        return ConvEncoder(cfg)
    return ViTEncoder(cfg)


def load_any_encoder_checkpoint(path: str | Path, cfg: EncoderConfig | None = None) -> nn.Module:
    """Like :func:`load_encoder_checkpoint` for every encoder family (ViT, Swin, conv)."""
    path = Path(path)
    state, meta = _read_encoder_file(path)
    enc = create_encoder(_file_config(path, meta, cfg))
    enc.load_timm_state_dict(state, str(path))  # type: ignore[operator]
    return enc
