"""The conv family: the Context Encoder's convolutional encoder (Pathak et al., CVPR 2016,
Sec. 3.1) behind the encoder contract.

``depth`` stride-2 4x4 convolutions with batch norm (all but the first) and leaky ReLU, as in the
released inpainting code, end at ``embed_dim`` channels; a masked region is filled with the mean
pixel (zero after ImageNet normalization) instead of a mask token. Presets ``ce_conv_128`` and
``ce_conv_32``. The rest of the recipe (channel-wise FC, up-convolutions, discriminator) is
:mod:`pretrain.context_encoder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from harness.core.config import EncoderConfig
from pretrain.encoders.base import Encoder, register_encoder


def mask_to_pixels(mask: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, L]`` patch mask to a pixel mask ``[B, 1, H, W]`` (1 = masked)."""
    m = mask.view(mask.shape[0], 1, grid[0], grid[1]).float()
    return m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


@register_encoder
class ConvEncoder(Encoder):
    """The Context Encoder's convolutional encoder.

    ``depth`` stride-2 4x4 convolutions end at ``embed_dim`` channels (each layer half the width
    of the next); ``patch_size`` is the masking unit in pixels.

    Args:
        cfg: Encoder config of a ``family: conv`` preset.
        options: None (the conv family has no options).
    """

    family: ClassVar[str] = "conv"
    full_grid_reason: ClassVar[str] = "a convolutional encoder needs the whole image"

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        img = int(cfg.img_size)  # type: ignore[arg-type]
        self.depth: int = int(cfg.depth)  # type: ignore[arg-type]
        if img % 2**self.depth:
            raise ValueError(
                f"{self.depth} stride-2 convs need img_size divisible by {2**self.depth}"
            )
        self._set_grid((img // self.patch_size, img // self.patch_size))
        widths = [max(8, self.embed_dim >> (self.depth - 1 - i)) for i in range(self.depth)]
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 4, stride=2, padding=1, bias=i == 0)]
            if i > 0:
                layers += [nn.BatchNorm2d(w)]
            layers += [nn.LeakyReLU(0.2)]
            cin = w
        self.convs = nn.Sequential(*layers)

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self  # not a timm model: the file holds the convs under their own names

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def encoder_stride(self) -> int:
        return 2**self.depth

    @property
    def feature_grid(self) -> tuple[int, int]:
        return self.block_grid(self.depth - 1)

    def block_grid(self, index: int) -> tuple[int, int]:
        """Grid after conv ``index`` (each halves it)."""
        s = int(self.cfg.img_size) // 2 ** (index + 1)  # type: ignore[arg-type]
        return s, s

    def residual_blocks(self) -> list[nn.Module]:
        return []  # plain convolutions: no residual branch to drop

    def no_weight_decay(self) -> set[str]:
        return set()

    def layer_id(self, name: str) -> int:
        """Conv ``i`` (of ``depth``) is group ``i + 1``."""
        name = name.removeprefix("encoder.")
        if name.startswith("convs."):
            idx = int(name.split(".")[1])
            return sum(isinstance(m, nn.Conv2d) for m in list(self.convs)[: idx + 1])
        return self.depth + 1

    # ------------------------------------------------------------------ forwards
    def _fill(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Masked units filled with the mean pixel (zero after normalization)."""
        if mask is None:
            return x
        pm = mask_to_pixels(mask, self.patch_size, self.grid_size)  # [B, 1, H, W]
        return x * (1.0 - pm.to(x.dtype))

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens ``[B, h*w, C]``; masked units are filled with the mean pixel (zero)."""
        return self.convs(self._fill(x, mask)).flatten(2).transpose(1, 2)

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, h_i * w_i, C_i]`` after each conv (with its norm and activation)."""
        t = self._fill(x, mask)
        outs = []
        for m in self.convs:
            t = m(t)
            if isinstance(m, nn.LeakyReLU):  # the end of one conv layer
                outs.append(t.flatten(2).transpose(1, 2))
        return outs
