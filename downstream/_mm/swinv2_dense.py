"""A SwinV2 encoder as a dense-prediction backbone (pure PyTorch, no mm imports).

OpenMMLab's mmdet / mmseg have no SwinV2 (mmpretrain's is not a dependency), so, unlike Swin
(:mod:`downstream._mm.swin_dense`, weights mapped into OpenMMLab's own Swin), the dense tasks run
our timm SwinV2 itself: :class:`DenseSwinV2` builds the pretraining architecture at the task's
input size and loads the encoder file as it is. This is what SwinV2's design allows: its
continuous position bias (an MLP over log-spaced relative coordinates, Liu et al. 2022, Sec.
3.3) has no table tied to the window or the resolution, so weights pretrained at 192 px load
unchanged into a 512 px backbone (every buffer that depends on the size is rebuilt, never
stored).

Outputs: the maps after the ``out_indices`` stages, each through a LayerNorm (the last stage's
is the encoder's final norm; the earlier ones are new, as OpenMMLab's Swin adds ``norm{i}`` for
every returned stage), ``[B, C_i, ceil(H / s_i), ceil(W / s_i)]`` at strides ``s_i = 4 * 2^i``.
Inputs up to the built size are padded (bottom / right) to it: detection pads every batch to a
fixed square and segmentation slides fixed crops, so the attention masks stay the built ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import ConfigError, EncoderConfig
from pretrain.encoders import create_encoder
from pretrain.encoders.swin import SwinEncoder

from .vit_dense import read_state_dict


def swinv2_stage_channels(encoder: EncoderConfig) -> list[int]:
    """Channels of the stage outputs: ``C, 2C, 4C, ...``."""
    n = len(encoder.timm_kwargs()["depths"])
    return [int(encoder.embed_dim) * 2**i for i in range(n)]  # type: ignore[operator]


class DenseSwinV2(nn.Module):
    """Our SwinV2 encoder returning stage maps for FPN / UperNet.

    Args:
        encoder: :class:`~harness.core.config.EncoderConfig` fields of a ``swinv2`` preset (the
            pretraining architecture; its ``img_size`` is replaced by ``img_size``).
        img_size: The task's input side (detection's padded square, segmentation's crop).
        out_indices: Stages (0-based) whose maps are returned; ``None``: all.
        drop_path_rate: Stochastic depth of the transfer run (timm's stage-wise rule).
        init_checkpoint: A mimbench encoder file or timm SwinV2 state dict (weights-only, strict
            over the encoder's weights); ``None`` keeps the random initialization.

    Raises:
        ConfigError: Not a SwinV2 encoder, or an input size the stages cannot tile.
    """

    def __init__(
        self,
        encoder: dict[str, Any],
        img_size: int,
        out_indices: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        cfg = EncoderConfig.model_validate(
            {**encoder, "img_size": img_size, "drop_path_rate": drop_path_rate}
        )
        if cfg.family != "swinv2":
            raise ConfigError(f"encoder '{cfg.arch}' is a {cfg.family} encoder, not a SwinV2")
        enc = create_encoder(cfg)
        assert isinstance(enc, SwinEncoder)  # the swinv2 family's class
        self.encoder = enc
        self.init_checkpoint = init_checkpoint
        n = enc.num_stages
        self.out_indices = list(range(n)) if out_indices is None else [i % n for i in out_indices]
        channels = swinv2_stage_channels(cfg)
        self.norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(channels[i]) for i in self.out_indices if i != n - 1}
        )
        enc.mask_token.requires_grad_(False)  # no masking in transfer

    @property
    def num_layers(self) -> int:
        """SwinV2 blocks over all stages (for layer-wise lr decay)."""
        return self.encoder.num_layers

    def layer_id(self, name: str) -> int:
        """LLRD group of a parameter named relative to this module: the encoder's numbering
        (:meth:`SwinEncoder.layer_id`); the new stage norms sit above every block."""
        if name.startswith("encoder."):
            return self.encoder.layer_id(name.removeprefix("encoder."))
        return self.num_layers + 1

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        """Names of parameters kept out of weight decay (SwinV2's continuous position bias
        MLP and logit scales, as the reference's ``no_weight_decay_keywords``)."""
        return self.encoder.no_decay_keywords

    def init_weights(self) -> None:
        """Load ``init_checkpoint`` into the encoder (weights-only, strict)."""
        if self.init_checkpoint:
            path = str(self.init_checkpoint)
            self.encoder.load_timm_state_dict(read_state_dict(path), path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, 3, H, W]`` (``H, W <=`` the built size) -> the ``out_indices`` stage maps."""
        size = int(self.encoder.cfg.img_size)  # type: ignore[arg-type]
        h, w = x.shape[-2:]
        if h > size or w > size:
            raise ConfigError(
                f"a {h}x{w} input does not fit the SwinV2 backbone built for {size}x{size}: set "
                "the task's img_size / crop_size to at least the largest input"
            )
        x = F.pad(x, (0, size - w, 0, size - h))
        swin = self.encoder.swin
        t = swin.patch_embed(x)  # [B, gh, gw, C] channels-last
        n = self.encoder.num_stages
        outs = []
        for i, stage in enumerate(swin.layers):
            t = stage(t)  # [B, h_i, w_i, C_i]
            if i in self.out_indices:
                norm = swin.norm if i == n - 1 else self.norms[str(i)]
                stride = self.encoder.patch_size * 2**i
                m = norm(t)[:, : math.ceil(h / stride), : math.ceil(w / stride)]
                outs.append(m.permute(0, 3, 1, 2).contiguous())  # [B, C_i, h_i', w_i']
        return tuple(outs)
