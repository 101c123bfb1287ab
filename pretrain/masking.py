"""Mask generators. Each returns a boolean mask ``[B, L]`` over the patch grid, True = masked,
with exactly the same number of masked patches in every sample (so visible tokens batch).

* ``random``: SimMIM's generator (Xie et al., CVPR 2022, Sec. 3.1 and Table 1): the image is
  divided into units of ``mask_patch_size`` pixels (32 px on 16 px patches in the paper), and
  ``ceil(ratio * units)`` units chosen uniformly at random are masked; each unit covers
  ``(mask_patch_size / patch_size)^2`` patches.
* ``shuffle``: MAE's per-sample random shuffle (He et al., CVPR 2022, Sec. 3): a uniform noise
  per token is sorted, and the last ``L - int(L * (1 - ratio))`` tokens of the order are masked.
"""

from __future__ import annotations

import math

import torch

from harness.config import MaskingConfig
from harness.registry import Registry

MASKERS: Registry[type[Masker]] = Registry("masking strategy")


class Masker:
    """Base class: builds masks for a ``grid`` of patches of ``patch_size`` pixels."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        self.cfg = cfg
        self.grid = grid
        self.patch_size = patch_size
        self.num_patches = grid[0] * grid[1]

    @property
    def num_masked(self) -> int:
        """Masked patches per sample."""
        raise NotImplementedError

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@MASKERS.register("random")
class RandomUnitMasker(Masker):
    """SimMIM's random masking aligned to a masked-patch size that may exceed the patch size."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        mps = cfg.mask_patch_size or patch_size
        if mps % patch_size:
            raise ValueError(
                f"mask_patch_size {mps} must be a multiple of the model patch size {patch_size}"
            )
        self.scale = mps // patch_size
        if grid[0] % self.scale or grid[1] % self.scale:
            raise ValueError(
                f"mask_patch_size {mps} does not tile the {grid[0] * patch_size}x"
                f"{grid[1] * patch_size} image; use a divisor of the image size"
            )
        self.unit_grid = (grid[0] // self.scale, grid[1] // self.scale)
        self.num_units = self.unit_grid[0] * self.unit_grid[1]
        self.units_masked = int(math.ceil(self.num_units * cfg.ratio))

    @property
    def num_masked(self) -> int:
        return self.units_masked * self.scale * self.scale

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(batch_size, self.num_units, generator=generator)  # [B, U]
        order = noise.argsort(dim=1)
        units = torch.zeros(batch_size, self.num_units, dtype=torch.bool)
        units.scatter_(1, order[:, : self.units_masked], True)
        units = units.view(batch_size, *self.unit_grid)  # [B, uh, uw]
        mask = units.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)  # [B, gh, gw]
        return mask.reshape(batch_size, self.num_patches)


@MASKERS.register("shuffle")
class ShuffleMasker(Masker):
    """MAE's per-sample random shuffle masking over individual tokens."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        if cfg.mask_patch_size not in (None, patch_size):
            raise ValueError(
                "shuffle masking works on single patches: set masking.mask_patch_size to null "
                f"(got {cfg.mask_patch_size} with patch size {patch_size})"
            )
        self.len_keep = int(self.num_patches * (1 - cfg.ratio))

    @property
    def num_masked(self) -> int:
        return self.num_patches - self.len_keep

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(batch_size, self.num_patches, generator=generator)  # [B, L]
        ids_shuffle = noise.argsort(dim=1)
        mask = torch.ones(batch_size, self.num_patches, dtype=torch.bool)
        mask.scatter_(1, ids_shuffle[:, : self.len_keep], False)
        return mask


def create_masker(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> Masker:
    """Build the masker named by ``cfg.strategy``."""
    return MASKERS.get(cfg.strategy)(cfg, grid, patch_size)


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible-first ordering of a mask with equal counts per sample.

    Returns:
        ``ids_keep [B, K]`` (visible patches in ascending order) and ``ids_restore [B, L]``
        such that ``torch.gather(shuffled, 1, ids_restore)`` puts tokens back in grid order.
    """
    counts = (~mask).sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("visible-only encoding needs the same number of visible patches per sample")
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    k = int(counts[0]) if counts.numel() else 0
    return ids_shuffle[:, :k], ids_restore
