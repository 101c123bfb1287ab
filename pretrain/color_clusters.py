"""iGPT's colour clusters as a MIM target (``target.type: color_clusters``, SimMIM Table 5).

iGPT (Chen et al., "Generative Pretraining from Pixels", ICML 2020, Sec. 3.3) reduces each
pixel's RGB value to the nearest of 512 colour clusters found by k-means on the training
pixels (a 9-bit palette), and predicts the cluster index with a cross-entropy. SimMIM Table 5
uses it as a classification target at 48^2 (the 192^2 entry is N/A in the paper). Here the
harness fits the palette itself before pretraining: k-means (:func:`pretrain.tokenizers.kmeans`,
k-means++ seeding, Lloyd iterations) in [0, 1] RGB on pixels of ``tokenizer.train_images``
training images pooled to the target resolution, with ``tokenizer.kmeans_iters`` iterations
and seed 0. The palette is a buffer of the target, so it is saved with the run's checkpoint and
restored on resume, as the k-means tokenizer's codebook is.

iGPT's encoder (:mod:`pretrain.encoders.igpt`) reads the same palette: the model copies it into
the encoder after the fit (:meth:`ColorClustersTarget.pixel_codebook`), so the one k-means fit
here serves as both the input tokenizer and the target of the iGPT recipes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.core.config import TargetConfig
from pretrain.targets import TARGETS, ImageSampler, Target, TargetOut, to_unit
from pretrain.tokenizers import kmeans, nearest


@TARGETS.register("color_clusters")
class ColorClustersTarget(Target):
    """Each target pixel's nearest colour cluster: ``cell*cell`` ``clusters``-way
    classifications per cell of the prediction grid.

    Attributes:
        palette: ``[clusters, 3]`` cluster centres in [0, 1] RGB (zeros until fitted).
        fitted: Whether :meth:`prepare` has fitted (or a checkpoint restored) the palette.
    """

    discrete_target = True
    supports_resolution = True
    max_points = 65536  # pixels k-means runs on (a random subset when there are more)

    def __init__(self, cfg: TargetConfig, patch_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, patch_size, grid)
        self.num_classes = cfg.clusters
        self.out_dim = self.cell * self.cell * cfg.clusters
        self.register_buffer("palette", torch.zeros(cfg.clusters, 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def pixels(self, imgs: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[B, 3, H, W]`` to target pixels ``[B, 3, k, k]`` in [0, 1]."""
        return to_unit(self.downsample(imgs.float()))

    def assign(self, pixels: torch.Tensor) -> torch.Tensor:
        """Nearest cluster of each pixel: ``[B, 3, k, k] -> [B, 1, k, k]`` (long)."""
        b, _, h, w = pixels.shape
        flat = pixels.permute(0, 2, 3, 1).reshape(-1, 3)  # [B*k*k, 3]
        return nearest(flat, self.palette.float()).view(b, 1, h, w)

    def prepare(self, sample_images: ImageSampler, log: Callable[[str], None]) -> None:
        """Fit the palette on training pixels unless it is already fitted (resumed run)."""
        if bool(self.fitted):
            return
        tok = self.cfg.tokenizer
        g = torch.Generator().manual_seed(0)
        pts = self.pixels(sample_images(tok.train_images)).permute(0, 2, 3, 1).reshape(-1, 3)
        if pts.shape[0] > self.max_points:
            pts = pts[torch.randperm(pts.shape[0], generator=g)[: self.max_points]]
        cent = kmeans(pts, self.num_classes, tok.kmeans_iters, g)
        err = ((pts - cent[nearest(pts, cent)]) ** 2).sum(1).mean()
        self.palette.copy_(cent)
        self.fitted.fill_(True)
        log(
            f"[color_clusters] {self.num_classes} RGB clusters over {pts.shape[0]} pixels at "
            f"{self.resolution}^2, mean squared distance {float(err):.5f}"
        )

    def pixel_codebook(self) -> torch.Tensor | None:
        """The palette once fitted, else None."""
        return self.palette if bool(self.fitted) else None

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> TargetOut:
        return TargetOut(self.cells(self.assign(self.pixels(imgs))))  # [B, L', cell*cell]

    def _draw(self, ids: torch.Tensor) -> torch.Tensor:
        """Cluster ids ``[B, L', cell*cell]`` painted in their colours, ``[B, 3, H, W]``."""
        b, n, c = ids.shape
        rgb = self.palette[ids.reshape(-1)].view(b, n, c, 3).reshape(b, n, c * 3)
        return self.to_image(rgb)

    def pred_image(self, pred: torch.Tensor, tgt: TargetOut) -> torch.Tensor:
        b, n, _ = pred.shape
        return self._draw(pred.float().view(b, n, -1, self.num_classes).argmax(-1))

    def target_image(self, tgt: TargetOut) -> torch.Tensor:
        return self._draw(tgt.value)
