"""MaskFeat: Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al., CVPR 2022).

MaskFeat masks patches like BEiT (block-wise, 40 % for images, mask token in the encoder) and
regresses, for every masked patch, its histograms of oriented gradients (HOG, Dalal & Triggs
2005) with an L2 loss through a linear head. HOG as MaskFeat computes it (Sec. 3.2 and the
released ``HOGLayerC``): gradients per RGB channel (Sobel filters on the reflect-padded image),
magnitudes optionally weighted by a Gaussian window repeated every 16 px, hard votes into 9
unsigned orientation bins over 180 degrees, sums over 8x8 cells, and an L2 normalization of each
cell's histogram (the local contrast normalization the paper finds essential). A 16 px patch
then holds 2 x 2 cells x 3 channels x 9 bins = 108 values.

``gradient: central`` swaps Sobel for [-1, 0, 1] differences that are zero on the image border,
the Dalal-Triggs / scikit-image convention: with ``gaussian_window: 0`` the histograms then equal
``skimage.feature.hog(..., cells_per_block=(1, 1), block_norm='L2')`` channel by channel (the
tests check this). Orientation is ``atan2(d_row, d_col)`` modulo 180 degrees in both cases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.core.config import HOGConfig, TargetConfig
from pretrain.targets import TARGETS, Target, TargetOut

HOG_EPS = 1e-5  # scikit-image's block-normalization epsilon


def gaussian_window(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MaskFeat's 2-D Gaussian ``[size, size]`` with sigma ``size / 2``, summing to 1."""
    n = torch.arange(size, dtype=dtype)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size / 2)) ** 2)
    k = torch.outer(g, g)
    return k / k.sum()


def image_gradients(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel gradients along rows and columns of ``[B, C, H, W]``.

    ``sobel``: 3x3 Sobel on the reflect-padded image (MaskFeat). ``central``: ``x[r+1] - x[r-1]``
    and ``x[c+1] - x[c-1]``, zero on the first and last row / column (scikit-image).
    """
    if kind == "sobel":
        c = x.shape[1]
        k_col = x.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        w_col = k_col.view(1, 1, 3, 3).repeat(c, 1, 1, 1)  # d/dcol
        w_row = k_col.t().contiguous().view(1, 1, 3, 3).repeat(c, 1, 1, 1)  # d/drow
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(xp, w_row, groups=c), F.conv2d(xp, w_col, groups=c)
    if kind == "central":
        g_row = torch.zeros_like(x)
        g_col = torch.zeros_like(x)
        g_row[:, :, 1:-1, :] = x[:, :, 2:, :] - x[:, :, :-2, :]
        g_col[:, :, :, 1:-1] = x[:, :, :, 2:] - x[:, :, :, :-2]
        return g_row, g_col
    raise ValueError(f"unknown gradient '{kind}': use sobel or central")


def hog_histograms(x: torch.Tensor, cfg: HOGConfig) -> torch.Tensor:
    """Per-channel cell histograms of oriented gradients, L2-normalized per cell.

    Args:
        x: Images ``[B, C, H, W]`` with H and W multiples of ``cfg.cell_size``.
        cfg: Orientations, cell size, gradient filter and Gaussian window.

    Returns:
        ``[B, C, orientations, H / cell, W / cell]``.
    """
    b, c, h, w = x.shape
    cell, nb = cfg.cell_size, cfg.orientations
    if h % cell or w % cell:
        raise ValueError(f"HOG cells of {cell} px do not tile {h}x{w} images")
    g_row, g_col = image_gradients(x, cfg.gradient)  # [B, C, H, W] each
    mag = torch.hypot(g_row, g_col)
    orient = torch.rad2deg(torch.atan2(g_row, g_col)) % 180.0  # unsigned, [0, 180)
    bins = torch.div(orient, 180.0 / nb, rounding_mode="floor").long().clamp_(0, nb - 1)
    if cfg.gaussian_window:
        gw = cfg.gaussian_window
        if h % gw or w % gw:
            raise ValueError(f"HOG gaussian_window {gw} does not tile {h}x{w} images")
        mag = mag * gaussian_window(gw, x.dtype).to(x.device).repeat(h // gw, w // gw)
    votes = torch.zeros(b, c, nb, h, w, dtype=x.dtype, device=x.device)
    votes.scatter_(2, bins.unsqueeze(2), mag.unsqueeze(2))  # [B, C, nb, H, W]
    hist = F.avg_pool2d(votes.view(b, c * nb, h, w), cell).view(b, c, nb, h // cell, w // cell)
    norm = torch.sqrt((hist**2).sum(dim=2, keepdim=True) + HOG_EPS**2)
    return hist / norm


def hog_to_patches(hist: torch.Tensor, cells_per_patch: int) -> torch.Tensor:
    """``[B, C, nb, Hc, Wc] -> [B, L, C * nb * k * k]``, k = cells per patch side (MaskFeat's
    layout: channel-major, then orientation, then the cells of the patch row by row)."""
    b, c, nb, hc, wc = hist.shape
    k = cells_per_patch
    x = hist.reshape(b, c * nb, hc // k, k, wc // k, k)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C*nb, k, k]
    return x.reshape(b, (hc // k) * (wc // k), c * nb * k * k)


def patches_to_hog(
    x: torch.Tensor, grid: tuple[int, int], channels: int, nb: int, k: int
) -> torch.Tensor:
    """The inverse of :func:`hog_to_patches`."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, channels * nb, k, k).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, nb, gh * k, gw * k)


def hog_glyphs(hist: torch.Tensor, cell: int) -> torch.Tensor:
    """Draw histograms as the usual HOG picture: in each cell, one line per orientation bin,
    perpendicular to the bin's gradient direction, as bright as the bin (channels averaged).

    Args:
        hist: ``[B, C, nb, Hc, Wc]``.
        cell: Cell size in pixels.

    Returns:
        ``[B, 3, Hc * cell, Wc * cell]`` in [0, 1].
    """
    nb = hist.shape[2]
    yy, xx = torch.meshgrid(
        torch.arange(cell) + 0.5 - cell / 2, torch.arange(cell) + 0.5 - cell / 2, indexing="ij"
    )
    templates = []
    for i in range(nb):
        theta = (i + 0.5) * math.pi / nb + math.pi / 2  # edge = perpendicular to the gradient
        dist = (xx * math.sin(theta) - yy * math.cos(theta)).abs()  # distance to the line
        templates.append((dist <= 0.5).float())
    weight = torch.stack(templates).unsqueeze(1).to(hist)  # [nb, 1, cell, cell]
    img = F.conv_transpose2d(
        hist.float().mean(dim=1).clamp_min(0), weight, stride=cell
    )  # [B, 1, H, W]
    img = img / img.flatten(1).amax(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return img.expand(-1, 3, -1, -1)


@TARGETS.register("hog")
class HOGTarget(Target):
    """HOG of every patch: ``(patch / cell)^2 * 3 * orientations`` values (108 for 16 px patches)."""

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        h = cfg.hog
        if patch_size % h.cell_size:
            raise ValueError(
                f"target.hog.cell_size {h.cell_size} must divide the patch size {patch_size}"
            )
        self.k = patch_size // h.cell_size
        self.out_dim = self.k * self.k * 3 * h.orientations

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> TargetOut:
        hist = hog_histograms(imgs.float(), self.cfg.hog)  # [B, 3, nb, Hc, Wc]
        return TargetOut(hog_to_patches(hist, self.k))  # [B, L, k*k*3*nb]

    def _glyphs(self, x: torch.Tensor) -> torch.Tensor:
        hist = patches_to_hog(x.float(), self.grid, 3, self.cfg.hog.orientations, self.k)
        return hog_glyphs(hist, self.cfg.hog.cell_size)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        return self._glyphs(pred)

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        return self._glyphs(tgt.value)
