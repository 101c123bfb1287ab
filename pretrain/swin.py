"""The Swin encoder wrapper: SimMIM's main setting (Xie et al., CVPR 2022, Sec. 4.1).

A thin layer over timm's :class:`~timm.models.swin_transformer.SwinTransformer` (Liu et al.,
ICCV 2021) with the same contract as :class:`pretrain.encoder.ViTEncoder`:

* the mask token replaces masked patch embeddings right after the patch embedding (and its
  norm), as in SimMIM's ``SwinTransformerForSimMIM``; masks live on the 4 px patch grid and are
  usually aligned to 32 px units (``masking.mask_patch_size: 32``);
* the output is the last stage's map at stride ``patch_size * 2^(stages - 1)`` (32 for the
  standard Swins), read by the heads through ``encoder_stride`` / ``num_features`` /
  ``feature_grid``; SimMIM's linear head is a 1x1 conv + pixel shuffle of that stride;
* there is no class token (``num_prefix_tokens = 0``) and no visible-only forward: window
  attention needs the full grid, which is why SimMIM keeps mask tokens in the encoder.

The timm model lives in ``self.swin``; its state dict keeps timm's key names, so a saved encoder
loads with ``timm.create_model(cfg.timm_name, checkpoint_path=..., **cfg.timm_kwargs())``.
Paper setting: ``encoder.arch: swin_base_192`` (Swin-B, 192 px, window 6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from harness.core.config import EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoder import ViTEncoder


class SwinEncoder(nn.Module):
    """A timm Swin Transformer with a mask token at the patch embedding.

    Args:
        cfg: Encoder config of a ``family: swin`` preset.
    """

    num_prefix_tokens = 0

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.family != "swin":
            raise ValueError(f"SwinEncoder needs a Swin preset, got '{cfg.arch}' ({cfg.family})")
        self.cfg = cfg
        self.swin = timm.create_model(
            cfg.timm_name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs()
        )
        self.patch_size: int = int(cfg.patch_size)  # type: ignore[arg-type]
        self.embed_dim: int = int(cfg.embed_dim)  # type: ignore[arg-type]
        self.grid_size: tuple[int, int] = tuple(self.swin.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_stages = len(self.swin.layers)
        down = 2 ** (self.num_stages - 1)
        if self.grid_size[0] % down or self.grid_size[1] % down:
            raise ValueError(
                f"Swin needs the patch grid {self.grid_size} divisible by {down} (its stride "
                f"{self.patch_size * down} px must tile the {cfg.img_size} px image)"
            )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._stage_offsets = [0]
        for layer in self.swin.layers:
            self._stage_offsets.append(self._stage_offsets[-1] + len(layer.blocks))

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of Swin blocks over all stages."""
        return self._stage_offsets[-1]

    @property
    def encoder_stride(self) -> int:
        """Pixels per output token: ``patch_size * 2^(stages - 1)`` (32 for Swin-B)."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def num_features(self) -> int:
        """Width of the last stage (``8 * embed_dim`` for four stages)."""
        return int(self.swin.num_features)

    @property
    def feature_grid(self) -> tuple[int, int]:
        """Grid of the last stage's tokens."""
        down = 2 ** (self.num_stages - 1)
        return self.grid_size[0] // down, self.grid_size[1] // down

    def no_weight_decay(self) -> set[str]:
        """The mask token and the relative position bias tables (as in timm / SimMIM)."""
        names = {
            f"swin.{n}"
            for n, _ in self.swin.named_parameters()
            if "relative_position_bias_table" in n
        }
        return names | {"mask_token"}

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay group: 0 = patch embedding, blocks numbered across stages from 1
        (a stage's downsampling joins its first block), ``num_layers + 1`` = final norm."""
        name = name.removeprefix("encoder.")
        if name.startswith(("swin.patch_embed", "mask_token", "swin.absolute_pos_embed")):
            return 0
        if name.startswith("swin.layers."):
            parts = name.split(".")
            stage = int(parts[2])
            block = int(parts[4]) if parts[3] == "blocks" else 0
            return self._stage_offsets[stage] + block + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ helpers
    patchify = ViTEncoder.patchify  # uses patch_size and grid_size only
    unpatchify = ViTEncoder.unpatchify

    def _check_input(self, x: torch.Tensor) -> None:
        exp = tuple(self.swin.patch_embed.img_size)
        if tuple(x.shape[-2:]) != exp:
            raise ValueError(
                f"encoder expects {exp[0]}x{exp[1]} images, got {x.shape[-2]}x{x.shape[-1]}: "
                "set the data transform to the encoder's img_size (or encoder.img_size)"
            )

    # ------------------------------------------------------------------ forwards
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (after the patch norm), ``[B, C, H, W] -> [B, L, D]``."""
        self._check_input(x)
        t = self.swin.patch_embed(x)  # [B, gh, gw, D] (timm's Swin is channels-last)
        return t.flatten(1, 2)

    def forward_tokens(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mask token, stages and final norm from patch embeddings ``[B, L, D]``.

        Returns:
            ``[B, h * w, C]``: the last stage's tokens in row-major order (no prefix token).
        """
        if mask is not None:
            w = mask.unsqueeze(-1).to(t.dtype)  # [B, L, 1]
            t = t * (1.0 - w) + self.mask_token.to(t.dtype) * w
        b, _, d = t.shape
        x = t.reshape(b, self.grid_size[0], self.grid_size[1], d)  # [B, gh, gw, D]
        x = self.swin.norm(self.swin.layers(x))  # [B, h, w, C]
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-stage tokens ``[B, h * w, C]``; masked patches see the mask token."""
        return self.forward_tokens(self.patch_tokens(x), mask)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "Swin's window attention needs every patch: encoder_mode 'visible' works with ViT "
            "encoders only; use encoder_mode: mask_token (SimMIM)"
        )

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int], norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps ``[B, C_i, H_i, W_i]`` after the stages in ``indices`` (0-based)."""
        t = self.swin.patch_embed(x)  # [B, gh, gw, D]
        outs: list[torch.Tensor] = []
        for i, stage in enumerate(self.swin.layers):
            t = stage(t)
            if i in indices:
                y = self.swin.norm(t) if norm and i == self.num_stages - 1 else t
                outs.append(y.permute(0, 3, 1, 2).contiguous())
        return outs

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """``avg``: mean of the output tokens ``[B, N, C] -> [B, C]`` (Swin has no class token)."""
        if pooling == "avg":
            return tokens.mean(dim=1)
        raise ValueError(f"Swin encoders pool with 'avg' only (no class token), got '{pooling}'")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, mask)

    # ------------------------------------------------------------------ checkpoints
    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The Swin's weights under timm's key names (no mask token)."""
        return {k: v.detach().cpu().clone() for k, v in self.swin.state_dict().items()}

    def save_timm(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{'state_dict': timm keys, 'mimbench': meta}`` atomically (see ViTEncoder)."""
        from harness.core.fsutil import atomic_torch_save

        payload = {
            "state_dict": self.timm_state_dict(),
            "mimbench": {
                "format": "mimbench-encoder",
                "version": 1,
                "family": "swin",
                "encoder": self.cfg.model_dump(mode="json"),
                "timm_name": self.cfg.timm_name,
                "timm_kwargs": self.cfg.timm_kwargs(),
                **(meta or {}),
            },
        }
        atomic_torch_save(payload, path)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load timm-keyed weights strictly; a mismatch names the keys."""
        own = self.swin.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        bad = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
        if missing or unexpected or bad:
            raise CheckpointError(
                f"checkpoint {source} does not fit Swin encoder '{self.cfg.arch}': "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {bad[:5]}"
            )
        self.swin.load_state_dict(state_dict, strict=True)
