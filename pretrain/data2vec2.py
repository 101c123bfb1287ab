"""data2vec 2.0's convolutional decoder (Baevski et al., "Efficient Self-supervised Learning with
Contextualized Target Representations for Vision, Speech and Language", ICML 2023; reference
code: fairseq ``examples/data2vec/models/modalities/modules.py`` ``Decoder2d``, fed by
``modalities/base.py`` ``ModalitySpecificEncoder.decoder_input`` and called from
``examples/data2vec/models/data2vec2.py`` ``Data2VecMultiModel.forward``).

The recipe's other parts exist elsewhere: the EMA teacher and its top-K instance-normed target
(:class:`pretrain.teacher.LatentTarget`, with its class-token loss ``target.latent.cls_weight``),
the inverse block masks (``d2v2_inverse_block`` in :mod:`pretrain.masking`), several masked
clones of each image sharing one teacher pass (``recipe.clone_batch``,
:class:`pretrain.model.MIMModel`), visible-only encoding (``encoder_mode: visible``). The recipe
file is ``pretrain/recipes/data2vec2.yaml``.

* Head (``head.type: conv_decoder``, :class:`ConvDecoder`): the student's visible tokens go back
  to their grid positions, the masked positions are filled with Gaussian noise of std
  ``head.mask_noise`` (the reference's ``mask_noise_std`` 0.01: no learned mask token), then
  ``head.depth`` blocks of (grouped ``kernel_size`` conv to ``head.dim`` channels, layer norm
  over the channels without affine, GELU), each added to its input when the widths match (the
  reference's ``decoder_residual``), run over the 2-D patch grid, and a linear layer to the
  target's width. The class token is not decoded (it has its own loss).

Not reproduced: the reference encoder's post-norm blocks with targets taken from each block's
FFN output before the residual (``AltBlock`` with ``layer_norm_first`` False and
``ffn_targets``): the harness's ViT is pre-norm and the teacher's targets are its end-of-block
outputs (:meth:`forward_blocks`); the reference's two "prenet" blocks of the modality encoder
are here the first two of the encoder's blocks (``top_k`` 10 of ViT-B's 12 = the reference's
10 shared blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import HeadConfig
from pretrain.heads import HEADS, Head


class _ConvBlock(nn.Module):
    """A grouped 'same' convolution, a layer norm over the channels (no affine) and a GELU:
    ``[B, C_in, h, w] -> [B, C_out, h, w]``."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [B, C, h, w]
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)
        return F.gelu(x)


@HEADS.register("conv_decoder")
class ConvDecoder(Head):
    """data2vec 2.0's decoder (module docstring).

    Args:
        encoder: A ViT (its width, patch grid and prefix tokens).
        cfg: ``depth`` conv blocks of ``dim`` channels, ``kernel_size``, ``groups``,
            ``mask_noise``.
        out_dim: Target width per patch.
        pixel_channels: Unused.
        pred_grid: Unused: the decoder predicts on the patch grid (``patch_grid_only``).

    Raises:
        ValueError: ``head.groups`` does not divide the encoder's width or ``head.dim``.
    """

    requires_full_sequence = False
    patch_grid_only = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        width = int(encoder.num_features)
        self.check_config(cfg, width)
        self.prefix = int(encoder.num_prefix_tokens)
        self.grid = tuple(int(g) for g in encoder.grid_size)
        self.mask_noise = cfg.mask_noise
        self.blocks = nn.ModuleList(
            _ConvBlock(width if i == 0 else cfg.dim, cfg.dim, cfg.kernel_size, cfg.groups)
            for i in range(cfg.depth)
        )
        self.proj = nn.Linear(cfg.dim, out_dim)

    @classmethod
    def check_config(cls, cfg: HeadConfig, width: int) -> None:
        """``head.groups`` must divide the encoder's width and ``head.dim`` (grouped convs)."""
        for name, value in (("the encoder's width", width), ("head.dim", cfg.dim)):
            if value % cfg.groups:
                raise ValueError(
                    f"head.groups {cfg.groups} does not divide {name} {value}: a grouped "
                    f"convolution needs both widths divisible; set head.groups to a common "
                    f"divisor of {width} and {cfg.dim}"
                )

    def fill(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Visible tokens ``[B, K, D]`` back on the grid ``[B, L, D]``, noise at the masked
        positions (``ids_restore`` from :func:`pretrain.masking.mask_to_indices`)."""
        b, k, d = visible.shape
        n = ids_restore.shape[1]
        if self.mask_noise > 0:
            fill = visible.new_empty(b, n - k, d).normal_(0.0, self.mask_noise)
        else:
            fill = visible.new_zeros(b, n - k, d)
        x = torch.cat([visible, fill], dim=1)  # visible first, as mask_to_indices orders them
        return x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predictions ``[B, L, out_dim]`` from the student's tokens ``[B, P + K, D]``
        (visible-only, with ``ids_restore``) or ``[B, P + L, D]`` (mask tokens)."""
        x = tokens[:, self.prefix :]
        if ids_restore is not None:
            x = self.fill(x, ids_restore)  # [B, L, D]
        b, n, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, *self.grid)  # [B, D, gh, gw]
        for blk in self.blocks:
            y = blk(x)
            x = y + x if y.shape == x.shape else y  # the reference's decoder_residual
        return self.proj(x.flatten(2).transpose(1, 2))  # [B, L, out_dim]
