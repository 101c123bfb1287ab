"""Context Encoders: Feature Learning by Inpainting (Pathak et al., CVPR 2016).

A convolutional encoder sees the image with a region dropped (filled with the mean pixel, zero
after ImageNet normalization), a channel-wise fully connected layer lets every position of each
feature map see the whole map without the cost of a full fully connected layer (``C * (hw)^2``
weights instead of ``(C hw)^2``), a stride-1 convolution mixes the channels, and up-convolutions
predict the pixels (Sec. 3.1). The loss is L2 on the dropped region plus an adversarial loss of a
discriminator that tells real images from ones with the prediction pasted in, weighted 0.999 and
0.001 (Sec. 3.2). Masks are the paper's three kinds: central square, random blocks, random
region (:mod:`pretrain.masking`).

Here the pieces fit the harness's contract: :class:`pretrain.encoders.conv.ConvEncoder` (presets
``ce_conv_128`` and ``ce_conv_32``: stride-2 4x4 convolutions with batch norm and leaky ReLU, as
in the released inpainting code) is the encoder, :class:`UpConvHead` (``head.type: upconv``)
holds the channel-wise FC layer and the decoder, and :class:`Discriminator` with
:func:`adversarial_losses` is switched on by ``loss.adv_weight``. The generator and the
discriminator train in one optimizer step: the discriminator's loss reaches only its own
parameters (it sees detached predictions) and the generator's adversarial term only the
generator's (it goes through a copy of the discriminator with detached weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.core.config import HeadConfig
from pretrain.heads import HEADS, Head, map_to_patches, tokens_to_map, upsample_factor
from pretrain.targets import patchify


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
        pred_grid: Must be the patch grid (or None).
    """

    patch_grid_only = True

    requires_full_sequence = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if pred_grid is not None:  # the patch grid only
            grid, feature = int(encoder.grid_size[0]), int(encoder.feature_grid[0])
            self.upsampling(int(pred_grid[0]), grid, feature)
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
