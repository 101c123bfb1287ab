"""The ViT family: timm's :class:`~timm.models.vision_transformer.VisionTransformer`
(Dosovitskiy et al., ICLR 2021) behind the encoder contract, with what masked image modeling
adds to it: a learned mask token (SimMIM, BEiT), the encoder on visible tokens only (MAE) and
fixed 2-D sin-cos position embeddings (MAE), learned ones or none; with ``layer_scale``, timm's
layer scale on every residual branch (``blocks.i.ls1.gamma`` / ``ls2.gamma``). A ViT with
relative position bias is the ``beit`` family (:mod:`pretrain.encoders.beit`).

The timm model lives in ``self.vit``; its state dict keeps timm's key names, so a saved encoder
loads with ``timm.create_model(name, num_classes=0, checkpoint_path=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import EncoderConfig
from pretrain.encoders.base import Encoder, InitParts, apply_mask_token, register_encoder


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """2-D sin-cos position embedding (MAE, after the Transformer's 1-D one).

    Half of the channels encode the row, half the column; each half is ``[sin, cos]`` of the
    coordinate times ``1 / 10000^(2i/d)``.

    Returns:
        Array ``[grid_h * grid_w, embed_dim]``, row-major over the grid.
    """
    if embed_dim % 4:
        raise ValueError(
            f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}"
        )
    ys, xs = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )

    def _1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)  # [M, dim/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's convention: the first half encodes w (x), the second h (y).
    return np.concatenate([_1d(embed_dim // 2, xs), _1d(embed_dim // 2, ys)], axis=1).astype(
        np.float32
    )


def set_sincos_pos_embed(pos_embed: nn.Parameter, grid: tuple[int, int]) -> None:
    """Fill a ``[1, 1 + L, D]`` position embedding with the fixed 2-D sin-cos one (class token
    position: zeros, as in MAE) and freeze it."""
    pe = sincos_pos_embed_2d(int(pos_embed.shape[-1]), *grid)
    with torch.no_grad():
        pos_embed.zero_()
        pos_embed[0, 1:].copy_(torch.from_numpy(pe))
    pos_embed.requires_grad_(False)


def dino_resample_positions(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """A ``[1, 1 + H * W, D]`` position embedding (class token first) resampled to another
    patch grid as the DINO / iBOT references do (bytedance/ibot models/vision_transformer.py,
    ``interpolate_pos_encoding``): bicubic, no antialiasing, no corner alignment, and driven by a
    *scale factor* of ``(new + 0.1) / old`` per side rather than by the output size, so the
    sampled source coordinates are ``(i + 0.5) * old / (new + 0.1) - 0.5`` (slightly off
    those of a size-driven resample, e.g. timm's ``resample_abs_pos_embed``). At the own grid
    the embedding is returned unchanged, as there."""
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    (oh, ow), (nh, nw) = old_grid, new_grid
    grid = pos_embed[:, 1:].reshape(1, oh, ow, -1).permute(0, 3, 1, 2)  # [1, D, H, W]
    out = F.interpolate(
        grid.float(), scale_factor=((nh + 0.1) / oh, (nw + 0.1) / ow), mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)  # fmt: skip
    if out.shape[-2:] != (nh, nw):
        raise ValueError(f"resampling a {oh}x{ow} position grid gave {tuple(out.shape[-2:])}, not {nh}x{nw}")
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, nh * nw, -1)], dim=1)


@register_encoder
class ViTEncoder(Encoder):
    """A timm ViT with mask-token and visible-only forwards.

    Args:
        cfg: Encoder config (preset plus overrides).
        options: None (the ViT family has no options).
    """

    family: ClassVar[str] = "vit"
    num_prefix_tokens: ClassVar[int] = 1
    isotropic: ClassVar[bool] = True
    visible_only: ClassVar[bool] = True
    token_input: ClassVar[bool] = True
    resizable_input: ClassVar[bool] = True

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        self.vit = timm.create_model(
            cfg.timm_name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs()
        )
        self._set_grid(tuple(self.vit.patch_embed.grid_size))
        if int(self.vit.num_prefix_tokens) != 1 or self.vit.no_embed_class:
            raise ValueError("ViTEncoder expects one class token with its own position embedding")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.abs_pos = cfg.pos_embed != "none"
        if cfg.pos_embed == "sincos":
            set_sincos_pos_embed(self.vit.pos_embed, self.grid_size)

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self.vit

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.vit.blocks)

    def residual_blocks(self) -> list[nn.Module]:
        return list(self.vit.blocks)

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(t)

    def init_parts(self) -> InitParts:
        learned = self.vit.pos_embed if self.cfg.pos_embed == "learned" else None
        return InitParts(
            patch_embed=self.vit.patch_embed.proj,
            mask_token=self.mask_token,
            class_token=self.vit.cls_token,
            learned_pos_embed=learned,
            residual_out=[(b.attn.proj, b.mlp.fc2) for b in self.vit.blocks],
        )

    def no_weight_decay(self) -> set[str]:
        """Position embedding, class token, mask token and layer-scale gammas (1-D, as BEiT's
        optimizer leaves out every 1-D parameter)."""
        names = {n for n, _ in self.named_parameters()}
        gammas = {n for n in names if n.endswith((".ls1.gamma", ".ls2.gamma"))}
        return ({"vit.pos_embed", "vit.cls_token", "mask_token"} & names) | gammas

    def layer_id(self, name: str) -> int:
        """0 = embeddings, i+1 = block i, L+1 = top."""
        name = name.removeprefix("encoder.")
        if name.startswith(("vit.cls_token", "vit.pos_embed", "vit.patch_embed", "mask_token")):
            return 0
        if name.startswith("vit.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ forwards
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings only, ``[B, C, H, W] -> [B, L, D]`` (before mask token and position)."""
        self._check_input(x)
        return self.vit.patch_embed(x)

    def _add_positions(self, t: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Position embeddings (if any; ``pos_embed`` ``[1, 1 + L, D]`` in place of the
        encoder's own) and the class token: ``[B, L, D] -> [B, 1 + L, D]``."""
        cls = self.vit.cls_token
        if self.abs_pos:
            pos = self.vit.pos_embed if pos_embed is None else pos_embed
            t = t + pos[:, 1:, :]
            cls = cls + pos[:, :1, :]
        return torch.cat([cls.expand(t.shape[0], -1, -1), t], dim=1)

    def forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm of unmasked images ``[B, C, h, w]`` of another side
        (a multiple of the patch size): the patch grid is theirs, the position embedding is
        resampled to it by :func:`dino_resample_positions` (the iBOT / DINO reference's
        ``interpolate_pos_encoding``); ``[B, 1 + L', D]``."""
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"a {h}x{w} image is not tiled by {p} px patches: use a multiple of {p}")
        pe = self.vit.patch_embed
        t = pe.norm(pe.proj(x).flatten(2).transpose(1, 2))  # [B, h*w/p^2, D]
        pos = None
        if self.abs_pos:
            pos = dino_resample_positions(self.vit.pos_embed, self.grid_size, (h // p, w // p))
        t = self._add_positions(t, pos)
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(t)))

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, class token and position embedding.

        Args:
            x: Images ``[B, C, H, W]``.
            mask: Optional boolean ``[B, L]``, True where the patch is masked.

        Returns:
            Tokens ``[B, 1 + L, D]``.
        """
        t = apply_mask_token(self.patch_tokens(x), mask, self.mask_token)  # [B, L, D]
        return self._add_positions(t)

    def forward_tokens(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_features` from given patch embeddings ``[B, L, D]`` (e.g. corrupted
        ones, ViT's masked patch prediction): mask token, positions, class token, blocks, norm."""
        t = self._add_positions(apply_mask_token(t, mask, self.mask_token))
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(t)))  # [B, 1 + L, D]

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + L, D]``; masked patches see the mask token."""
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(self.embed(x, mask))))

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + L, D]`` after each block, before the final norm."""
        t = self.vit.norm_pre(self.embed(x, mask))
        outs = []
        for blk in self.vit.blocks:
            t = blk(t)
            outs.append(t)
        return outs

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
        return self.vit.norm(self.vit.blocks(self.vit.norm_pre(t)))
