"""The tokenizer interface (normalized images -> token grids on the encoder's patch grid) and its
registry; the tokenizers themselves live in :mod:`pretrain.tokenizers` and :mod:`pretrain.dall_e`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import TokenizerConfig
from harness.core.config.axes import TOKENIZERS as _TOKENIZERS
from harness.core.registry import Registry

#: The core registry (config validation reads it).
TOKENIZERS: Registry[type[Tokenizer]] = _TOKENIZERS


class Tokenizer(nn.Module):
    """Base class: normalized images to token grids.

    Args:
        cfg: Tokenizer config.
        img_size: The encoder's input size.
        grid: The encoder's patch grid, which the token grid must equal.
    """

    needs_fit = True

    def __init__(self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.grid = grid
        self.input_size = cfg.input_size or img_size
        if self.input_size % grid[0] or self.input_size % grid[1]:
            raise ValueError(
                f"tokenizer input_size {self.input_size} is not a multiple of the {grid[0]}x{grid[1]} "
                "patch grid: the token grid must equal the patch grid"
            )
        self.down = self.input_size // grid[0]
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def resize(self, imgs: torch.Tensor) -> torch.Tensor:
        """Resize ``[B, 3, H, W]`` to the tokenizer's input size (bilinear, antialiased)."""
        if imgs.shape[-1] == self.input_size and imgs.shape[-2] == self.input_size:
            return imgs
        return F.interpolate(
            imgs,
            size=(self.input_size, self.input_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[B, 3, H, W]`` to tokens ``[B, L]``."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Tokens ``[B, L]`` to images in [0, 1], or None when the tokenizer has no decoder."""
        return None

    def fit(self, images: torch.Tensor, log: Callable[[str], None], seed: int = 0) -> None:
        """Fit on normalized images ``[N, 3, H, W]``."""
        raise NotImplementedError
