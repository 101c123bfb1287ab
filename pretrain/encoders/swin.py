"""The Swin family: SimMIM's main setting (Xie et al., CVPR 2022, Sec. 4.1).

timm's :class:`~timm.models.swin_transformer.SwinTransformer` (Liu et al., ICCV 2021) behind the
encoder contract:

* the mask token replaces masked patch embeddings right after the patch embedding (and its
  norm), as in SimMIM's ``SwinTransformerForSimMIM``; masks live on the 4 px patch grid and are
  usually aligned to 32 px units (``masking.mask_patch_size: 32``);
* the output is the last stage's map at stride ``patch_size * 2^(stages - 1)`` (32 for the
  standard Swins), read by the heads through ``encoder_stride`` / ``num_features`` /
  ``feature_grid``; SimMIM's linear head is a 1x1 conv + pixel shuffle of that stride;
* there is no class token and no visible-only forward: window attention needs the full grid,
  which is why SimMIM keeps mask tokens in the encoder.

The timm model lives in ``self.swin``; its state dict keeps timm's key names, so a saved encoder
loads with ``timm.create_model(cfg.timm_name, checkpoint_path=..., **cfg.timm_kwargs())``.
Paper setting: ``encoder.arch: swin_base_192`` (Swin-B, 192 px, window 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import timm
import torch
from torch import nn

from harness.core.config import EncoderConfig
from pretrain.encoders.base import Encoder, InitParts, apply_mask_token, register_encoder


@register_encoder
class SwinEncoder(Encoder):
    """A timm Swin Transformer with a mask token at the patch embedding.

    Args:
        cfg: Encoder config of a ``family: swin`` preset.
        options: None (the Swin family has no options).
    """

    family: ClassVar[str] = "swin"
    token_input: ClassVar[bool] = True
    full_grid_reason: ClassVar[str] = "Swin's window attention needs every patch"
    #: Parameters whose name holds one of these are not weight-decayed (with the mask token).
    no_decay_keywords: ClassVar[tuple[str, ...]] = ("relative_position_bias_table",)

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        if cfg.family != self.family:
            raise ValueError(
                f"{type(self).__name__} needs a {self.family} preset, got '{cfg.arch}' "
                f"({cfg.family})"
            )
        super().__init__(cfg, options)
        self.swin = timm.create_model(
            cfg.timm_name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **cfg.timm_kwargs()
        )
        self._set_grid(tuple(self.swin.patch_embed.grid_size))
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

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self.swin

    @property
    def num_layers(self) -> int:
        """Number of Swin blocks over all stages."""
        return self._stage_offsets[-1]

    def init_parts(self) -> InitParts:
        blocks = [b for layer in self.swin.layers for b in layer.blocks]
        return InitParts(
            patch_embed=self.swin.patch_embed.proj,
            mask_token=self.mask_token,
            residual_out=[(b.attn.proj, b.mlp.fc2) for b in blocks],
        )

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
        return self.block_grid(self.num_stages - 1)

    def block_grid(self, index: int) -> tuple[int, int]:
        """Grid of stage ``index`` (each stage after the first halves it)."""
        down = 2**index
        return self.grid_size[0] // down, self.grid_size[1] // down

    def residual_blocks(self) -> list[nn.Module]:
        return [b for layer in self.swin.layers for b in layer.blocks]

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.swin.norm(t)

    def no_weight_decay(self) -> set[str]:
        """The mask token and the parameters named by :attr:`no_decay_keywords` (Swin: the
        relative position bias tables, as in timm / SimMIM)."""
        names = {
            f"swin.{n}"
            for n, _ in self.swin.named_parameters()
            if any(k in n for k in self.no_decay_keywords)
        }
        return names | {"mask_token"}

    def layer_id(self, name: str) -> int:
        """0 = patch embedding, blocks numbered across stages from 1 (a stage's downsampling
        joins its first block), ``num_layers + 1`` = final norm."""
        name = name.removeprefix("encoder.")
        if name.startswith(("swin.patch_embed", "mask_token", "swin.absolute_pos_embed")):
            return 0
        if name.startswith("swin.layers."):
            parts = name.split(".")
            stage = int(parts[2])
            block = int(parts[4]) if parts[3] == "blocks" else 0
            return self._stage_offsets[stage] + block + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ forwards
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (after the patch norm), ``[B, C, H, W] -> [B, L, D]``."""
        self._check_input(x)
        t = self.swin.patch_embed(x)  # [B, gh, gw, D] (timm's Swin is channels-last)
        return t.flatten(1, 2)

    def _grid_map(self, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mask token, then tokens ``[B, L, D]`` as timm's channels-last map ``[B, gh, gw, D]``."""
        t = apply_mask_token(t, mask, self.mask_token)
        return t.reshape(t.shape[0], self.grid_size[0], self.grid_size[1], t.shape[-1])

    def forward_tokens(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mask token, stages and final norm from patch embeddings ``[B, L, D]``.

        Returns:
            ``[B, h * w, C]``: the last stage's tokens in row-major order (no prefix token).
        """
        x = self.swin.norm(self.swin.layers(self._grid_map(t, mask)))  # [B, h, w, C]
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last-stage tokens ``[B, h * w, C]``; masked patches see the mask token."""
        return self.forward_tokens(self.patch_tokens(x), mask)

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, h_i * w_i, C_i]`` after each stage, before the final norm."""
        t = self._grid_map(self.patch_tokens(x), mask)  # [B, gh, gw, D]
        outs = []
        for stage in self.swin.layers:
            t = stage(t)  # [B, h_i, w_i, C_i]
            outs.append(t.flatten(1, 2))
        return outs
