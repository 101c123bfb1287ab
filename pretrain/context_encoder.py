"""Context Encoders: Feature Learning by Inpainting (Pathak et al., CVPR 2016).

A convolutional encoder sees the image with a region dropped (filled with the mean pixel, zero
after ImageNet normalization), a channel-wise fully connected layer lets every position of each
feature map see the whole map without the cost of a full fully connected layer (``C * (hw)^2``
weights instead of ``(C hw)^2``), a stride-1 convolution mixes the channels, and up-convolutions
predict the pixels (Sec. 3.1). The loss is L2 on the dropped region plus an adversarial loss of a
discriminator that tells real images from ones with the prediction pasted in, weighted 0.999 and
0.001 (Sec. 3.2). Masks are the paper's three kinds: central square, random blocks, random
region (:mod:`pretrain.masking`).

Here the pieces fit the harness's contract: :class:`ConvEncoder` (presets ``ce_conv_128`` and
``ce_conv_32``: stride-2 4x4 convolutions with batch norm and leaky ReLU, as in the released
inpainting code) is the encoder, :class:`UpConvHead` (``head.type: upconv``) holds the
channel-wise FC layer and the decoder, and :class:`Discriminator` with
:func:`adversarial_losses` is switched on by ``loss.adv_weight``. The generator and the
discriminator train in one optimizer step: the discriminator's loss reaches only its own
parameters (it sees detached predictions) and the generator's adversarial term only the
generator's (it goes through a copy of the discriminator with detached weights).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.core.config import EncoderConfig, HeadConfig
from harness.core.errors import CheckpointError
from pretrain.encoder import ViTEncoder
from pretrain.heads import HEADS, Head, map_to_patches, tokens_to_map, upsample_factor
from pretrain.targets import patchify


class ConvEncoder(nn.Module):
    """The Context Encoder's convolutional encoder with the harness's encoder contract.

    ``depth`` stride-2 4x4 convolutions end at ``embed_dim`` channels (each layer half the width
    of the next); ``patch_size`` is the masking unit in pixels.

    Args:
        cfg: Encoder config of a ``family: conv`` preset.
    """

    num_prefix_tokens = 0

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size: int = int(cfg.patch_size)  # type: ignore[arg-type]
        self.embed_dim: int = int(cfg.embed_dim)  # type: ignore[arg-type]
        img = int(cfg.img_size)  # type: ignore[arg-type]
        self.depth: int = int(cfg.depth)  # type: ignore[arg-type]
        if img % 2**self.depth:
            raise ValueError(
                f"{self.depth} stride-2 convs need img_size divisible by {2**self.depth}"
            )
        self.grid_size = (img // self.patch_size, img // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
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

    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def encoder_stride(self) -> int:
        return 2**self.depth

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def feature_grid(self) -> tuple[int, int]:
        s = int(self.cfg.img_size) // self.encoder_stride  # type: ignore[arg-type]
        return s, s

    def no_weight_decay(self) -> set[str]:
        return set()

    def layer_id(self, name: str) -> int:
        """Conv ``i`` (of ``depth``) is group ``i + 1``."""
        name = name.removeprefix("encoder.")
        if name.startswith("convs."):
            idx = int(name.split(".")[1])
            return sum(isinstance(m, nn.Conv2d) for m in list(self.convs)[: idx + 1])
        return self.depth + 1

    patchify = ViTEncoder.patchify
    unpatchify = ViTEncoder.unpatchify

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens ``[B, h*w, C]``; masked units are filled with the mean pixel (zero)."""
        if mask is not None:
            pm = mask_to_pixels(mask, self.patch_size, self.grid_size)  # [B, 1, H, W]
            x = x * (1.0 - pm.to(x.dtype))
        return self.convs(x).flatten(2).transpose(1, 2)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "a convolutional encoder needs the whole image: use encoder_mode: mask_token"
        )

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        return tokens.mean(dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, mask)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def save_timm(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{'state_dict', 'mimbench'}`` like the ViT files (not a timm model: no timm keys)."""
        from harness.core.fsutil import atomic_torch_save

        payload = {
            "state_dict": self.timm_state_dict(),
            "mimbench": {
                "format": "mimbench-encoder",
                "version": 1,
                "family": "conv",
                "encoder": self.cfg.model_dump(mode="json"),
                **(meta or {}),
            },
        }
        atomic_torch_save(payload, path)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {source} does not fit conv encoder '{self.cfg.arch}': "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def mask_to_pixels(mask: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, L]`` patch mask to a pixel mask ``[B, 1, H, W]`` (1 = masked)."""
    m = mask.view(mask.shape[0], 1, grid[0], grid[1]).float()
    return m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)


class ChannelwiseFC(nn.Module):
    """Each channel's ``h*w`` map fully connected to itself, no weights across channels."""

    def __init__(self, channels: int, positions: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(channels, positions, positions) / math.sqrt(positions)
        )
        self.bias = nn.Parameter(torch.zeros(channels, positions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = torch.einsum("bcp,cpq->bcq", x.reshape(b, c, h * w), self.weight) + self.bias
        return y.view(b, c, h, w)  # [B, C, h, w]


@HEADS.register("upconv")
class UpConvHead(Head):
    """Channel-wise FC + 1x1 conv, then stride-2 up-convolutions (batch norm, ReLU) from the
    encoder's stride to full resolution for per-pixel targets (``pixel_channels`` channels, then
    patchified), or to the patch grid for per-patch targets (then a 1x1 conv to ``out_dim``).

    Args:
        encoder: The encoder whose tokens it reads.
        cfg: ``dim`` is the width of the first up-convolution (halved at each, at least 16).
        out_dim: Predictions per patch.
        pixel_channels: Values per pixel of a per-pixel target, else None.
    """

    requires_full_sequence = True

    def __init__(
        self, encoder: nn.Module, cfg: HeadConfig, out_dim: int, pixel_channels: int | None = None
    ) -> None:
        super().__init__()
        self.prefix, self.grid = int(encoder.num_prefix_tokens), tuple(encoder.feature_grid)
        self.patch_size = int(encoder.patch_size)
        c = int(encoder.num_features)
        self.fc = ChannelwiseFC(c, self.grid[0] * self.grid[1])
        self.mix = nn.Conv2d(c, c, 1)
        up = int(encoder.encoder_stride) if pixel_channels else upsample_factor(encoder)
        n_up = int(round(math.log2(up)))
        if 2**n_up != up:
            raise ValueError(f"upconv upsamples by powers of 2, needs {up}")
        layers: list[nn.Module] = []
        cin, width = c, cfg.dim
        for _ in range(n_up):
            layers += [
                nn.ConvTranspose2d(cin, width, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            cin, width = width, max(16, width // 2)
        self.pixel_channels = pixel_channels
        layers += [
            nn.Conv2d(
                cin,
                pixel_channels or out_dim,
                3 if pixel_channels else 1,
                padding=1 if pixel_channels else 0,
            )
        ]
        self.decoder = nn.Sequential(*layers)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = tokens_to_map(tokens, self.prefix, self.grid)  # [B, C, h, w]
        x = self.decoder(self.mix(F.relu(self.fc(x))))
        if self.pixel_channels:
            return patchify(x, self.patch_size)  # [B, C', H, W] -> [B, L, p*p*C']
        return map_to_patches(x)  # [B, L, out_dim]


class Discriminator(nn.Module):
    """A DCGAN-style discriminator: stride-2 4x4 convs with leaky ReLU down to 4x4, then a
    4x4 conv to one logit per image (no batch norm, so a weight-detached copy is exact)."""

    def __init__(self, img_size: int, width: int = 32) -> None:
        super().__init__()
        n = max(1, int(round(math.log2(img_size / 4))))
        layers: list[nn.Module] = []
        cin = 3
        for i in range(n):
            w = min(512, width * 2**i)
            layers += [nn.Conv2d(cin, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            cin = w
        layers += [nn.Conv2d(cin, 1, img_size // 2**n)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()  # [B] logits


def adversarial_losses(
    disc: Discriminator, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator's and the discriminator's adversarial losses (binary cross-entropy).

    Args:
        disc: The discriminator.
        real: Original images ``[B, 3, H, W]``.
        fake: Images with the prediction pasted into the masked region.

    Returns:
        ``(g_loss, d_loss)``: ``g_loss`` trains only the generator (through a copy of ``disc``
        with detached weights), ``d_loss`` only the discriminator (on detached ``fake``).
    """
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    g_logits = functional_call(disc, frozen, (fake,))
    g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
    d_real, d_fake = disc(real), disc(fake.detach())
    d_loss = F.binary_cross_entropy_with_logits(
        d_real, torch.ones_like(d_real)
    ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    return g_loss, d_loss
