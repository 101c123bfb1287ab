"""Mask generators. Each returns a boolean mask ``[B, L]`` over the patch grid, True = masked,
with exactly the same number of masked patches in every sample (so visible tokens batch).

* ``random``: SimMIM's generator (Xie et al., CVPR 2022, Sec. 3.1 and Table 1): the image is
  divided into units of ``mask_patch_size`` pixels (32 px on 16 px patches in the paper), and
  ``ceil(ratio * units)`` units chosen uniformly at random are masked; each unit covers
  ``(mask_patch_size / patch_size)^2`` patches.
* ``shuffle``: MAE's per-sample random shuffle (He et al., CVPR 2022, Sec. 3): a uniform noise
  per token is sorted, and the last ``L - int(L * (1 - ratio))`` tokens of the order are masked.
* ``block``: BEiT's block-wise masking (Bao et al., ICLR 2022, Algorithm 1): rectangles with an
  area drawn from ``[min_block_patches, remaining]`` and a log-uniform aspect ratio in
  ``[min_aspect, 1 / min_aspect]`` are added while they bring at most the remaining count.
* ``central``: Context Encoder's central square (Pathak et al., CVPR 2016, Sec. 3.3): the same
  centered rectangle of ``sqrt(ratio)`` of each side in every sample.
* ``random_blocks``: Context Encoder's "random block": several smaller, possibly overlapping
  rectangles placed uniformly.
* ``random_region``: Context Encoder's "random region": one connected region of random shape.
  The paper takes shapes from PASCAL VOC segmentations; without that data, the region is grown
  from a random seed unit by adding random neighbours (Eden growth).
* ``grid``: MAE's grid-wise sampling (Table 1f): one unit of every ``k x k`` is kept, with
  ``k = 1 / sqrt(1 - ratio)`` (ratio 0.75: one of every four), at a random offset per sample.
* ``ibot_block``: iBOT's block-wise masking (Zhou et al., ICLR 2022, Sec. 3.3 and appendix;
  reference: bytedance/ibot ``loader.py`` ``ImageFolderMask``): each image draws its own ratio
  (uniform in ``ratio +- ratio_var``; with probability ``1 - mask_prob`` none), and BEiT's
  rectangles are added up to that count, stopping when none fits: the only masker whose count
  varies per image (``per_image_ratio``), so it needs mask tokens.
* ``capi_inverse_block``: CAPI's inverse block masking (Darcet et al. 2025; reference:
  facebookresearch/capi ``data.py`` ``InverseBlockMasking``): the visible patches are one
  rectangle of aspect ratio in ``[min_aspect, 1 / min_aspect]`` cut to exactly
  ``L - int(ratio * L)`` patches, rolled by a random offset (wrapping around the image), and
  everything else is masked.
* ``d2v2_inverse_block``: data2vec 2.0's inverse block masking (Baevski et al., ICML 2023;
  reference: fairseq ``data/data_utils.py`` ``compute_block_mask_2d`` with ``inverse_mask``
  and ``require_same_masks``, called by ``examples/data2vec/models/modalities/images.py``
  ``ImageEncoder.compute_mask``): ``int(units x (1 - ratio + ratio_adjust) / block_length^2)``
  centres are drawn uniformly (with replacement), the ``block_length`` square around each
  (clamped at the border) is made visible, then random visible units are hidden or random
  hidden units shown until exactly ``units - int(units x (1 - ratio))`` are masked. The
  reference rolls nothing (CAPI's roll is CAPI's), so neither does this masker.
* ``bernoulli``: iGPT's BERT mask (Chen et al., ICML 2020, Sec. 2.2; reference
  openai/image-gpt ``src/model.py``, ``model``: ``uniform > bert_mask_prob``): every token is
  masked on its own with probability ``ratio`` (0.15), so the count varies per image
  (``per_image_ratio``; ``ratio_var`` and ``mask_prob`` as for ``ibot_block``).
* ``raster``: iGPT's autoregressive objective (Sec. 2.1): every token is predicted (the mask
  is all True) from the ones before it in raster order; the masker is ``causal``, so the model
  builds its encoder with causal attention (:class:`pretrain.encoders.igpt.IGPTEncoder`).

The unit maskers (``block`` to ``d2v2_inverse_block``, :class:`UnitMasker`) work on masking
units of ``mask_patch_size`` pixels like ``random`` and draw each
sample with Python's ``random.Random`` seeded from the torch generator, so masks are a function
of the generator state. ``block``, ``random_blocks`` and ``random_region`` hit the count exactly:
when BEiT's rejection loop stops short, the block mask grows by random neighbouring units, and
the last random block is cut to the count.

``masking.predict_fraction`` below 1 (CAPI's ``prediction_subsampling``, :class:`SubsetMasker`)
wraps any of them: of each image's masked patches only a random subset is predicted, the rest
stay hidden from the encoder without a prediction or a loss (code 2, as I-JEPA's patches
outside both blocks).

The unit grid and the count come from :func:`harness.core.config.plan_masking`, the same rule that
config validation applies: a unit that is not whole patches tiling the image, or a count that
masks every unit or none, is an error (with the numbers), never clamped.
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

import numpy as np
import torch

from harness.core.config import MaskingConfig, plan_masking
from harness.core.config.axes import MASKERS as _MASKERS
from harness.core.registry import Registry

MASKERS: Registry[type[Masker]] = _MASKERS  # the core registry (config validation reads it)


class Masker:
    """Base class: builds masks for a ``grid`` of patches of ``patch_size`` pixels.

    Attributes:
        per_image_ratio: Whether each image draws its own count (config validation reads it:
            ``ratio_var`` / ``mask_prob`` need it, visible-only encoding refuses it).
        causal: Every token is predicted from the ones before it: the encoder attends causally
            (the model passes its ``causal`` option; iGPT's autoregressive objective).
        varying_predicted: The number of predicted patches varies per image although the hidden
            count does not (I-JEPA's overlapping target blocks); config validation refuses it,
            like ``per_image_ratio``, for a head that needs equal counts.

    Raises:
        ConfigError: From :func:`harness.core.config.plan_masking`: the units do not fit the grid or
            the mask would hide every patch or none.
    """

    per_image_ratio: ClassVar[bool] = False
    causal: ClassVar[bool] = False
    varying_predicted: ClassVar[bool] = False

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        self.cfg = cfg
        self.grid = grid
        self.patch_size = patch_size
        self.num_patches = grid[0] * grid[1]
        self.plan = plan_masking(cfg, grid, patch_size)
        self.scale = self.plan.scale  # patches per unit side
        self.unit_grid = self.plan.unit_grid
        self.num_units = self.plan.num_units
        self.units_masked = self.plan.units_masked

    @property
    def num_masked(self) -> int:
        """Masked patches per sample."""
        return self.plan.num_masked

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@MASKERS.register("random")
class RandomUnitMasker(Masker):
    """SimMIM's random masking aligned to a masked-patch size that may exceed the patch size
    (``ceil(ratio * units)`` units)."""

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
        self.len_keep = self.num_patches - self.units_masked  # MAE: int(L * (1 - ratio))

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(batch_size, self.num_patches, generator=generator)  # [B, L]
        ids_shuffle = noise.argsort(dim=1)
        mask = torch.ones(batch_size, self.num_patches, dtype=torch.bool)
        mask.scatter_(1, ids_shuffle[:, : self.len_keep], False)
        return mask


@MASKERS.register("bernoulli")
class BernoulliMasker(Masker):
    """iGPT's BERT mask: each token masked independently with probability ``ratio`` (drawn per
    image in ``ratio +- ratio_var`` when ``ratio_var`` > 0; an image is masked at all with
    probability ``mask_prob``)."""

    per_image_ratio = True

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.cfg
        p = torch.full((batch_size, 1), c.ratio)
        if c.ratio_var > 0:
            p = p + (torch.rand(batch_size, 1, generator=generator) * 2 - 1) * c.ratio_var
        if c.mask_prob < 1.0:
            p = p * (torch.rand(batch_size, 1, generator=generator) < c.mask_prob)
        return torch.rand(batch_size, self.num_patches, generator=generator) < p  # [B, L]


@MASKERS.register("raster")
class RasterMasker(Masker):
    """iGPT's autoregressive objective: every token is predicted, each from the tokens before it
    in raster order (``causal``); ``ratio`` is unused."""

    causal = True

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.ones(batch_size, self.num_patches, dtype=torch.bool)


class UnitMasker(Masker):
    """Base of the maskers that draw each sample on a grid of ``mask_patch_size`` units.

    Subclasses implement :meth:`sample_units`, one ``[uh, uw]`` boolean array per sample.
    """

    def sample_units(self, rng: random.Random) -> np.ndarray:
        """One sample's mask over the unit grid, ``[uh, uw]`` bool with ``units_masked`` set."""
        raise NotImplementedError

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = random.Random(seed)
        units = torch.from_numpy(np.stack([self.sample_units(rng) for _ in range(batch_size)]))
        mask = units.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)  # [B, gh, gw]
        return mask.reshape(batch_size, self.num_patches)


def _grow(mask: np.ndarray, count: int, rng: random.Random) -> int:
    """Mask ``count`` more units, each a random visible 4-neighbour of the masked set (a random
    visible unit when nothing is masked yet). Returns how many were added."""
    added = 0
    while added < count:
        m = mask
        near = np.zeros_like(m)
        near[1:] |= m[:-1]
        near[:-1] |= m[1:]
        near[:, 1:] |= m[:, :-1]
        near[:, :-1] |= m[:, 1:]
        cand = np.argwhere(near & ~m) if m.any() else np.argwhere(~m)
        if len(cand) == 0:  # the masked set has no visible neighbour left
            cand = np.argwhere(~m)
        r, c = cand[rng.randrange(len(cand))]
        mask[r, c] = True
        added += 1
    return added


@MASKERS.register("block")
class BlockMasker(UnitMasker):
    """BEiT's block-wise masking (Algorithm 1 of the paper, as in its reference code).

    ``last_blocks`` keeps the rectangles of the most recent sample as
    ``(top, left, h, w, target_area, aspect)`` and ``last_grown`` the units added to reach the
    exact count; the tests check them against the paper's bounds.
    """

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.min_area = cfg.min_block_patches
        self.max_area = cfg.max_block_patches or self.units_masked
        self.log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
        self.last_blocks: list[tuple[int, int, int, int, float, float]] = []
        self.last_grown = 0

    def _add_block(self, mask: np.ndarray, max_new: float, rng: random.Random) -> int:
        uh, uw = self.unit_grid
        for _ in range(10):  # BEiT: ten attempts per block
            area = rng.uniform(self.min_area, max_new)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < w < uw and 0 < h < uh:
                top, left = rng.randint(0, uh - h), rng.randint(0, uw - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= max_new:
                    mask[top : top + h, left : left + w] = True
                    self.last_blocks.append((top, left, h, w, area, aspect))
                    return new
        return 0

    def sample_units(self, rng: random.Random) -> np.ndarray:
        mask = np.zeros(self.unit_grid, dtype=bool)
        self.last_blocks = []
        count = 0
        while count < self.units_masked:
            delta = self._add_block(mask, min(self.units_masked - count, self.max_area), rng)
            if delta == 0:
                break
            count += delta
        self.last_grown = _grow(mask, self.units_masked - count, rng)
        return mask


@MASKERS.register("central")
class CentralMasker(UnitMasker):
    """Context Encoder's central region: a centered rectangle of ``sqrt(ratio)`` of each side."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        uh, uw = self.unit_grid
        self.box_h, self.box_w = self.plan.box  # type: ignore[misc]
        self.top, self.left = (uh - self.box_h) // 2, (uw - self.box_w) // 2

    def sample_units(self, rng: random.Random) -> np.ndarray:
        mask = np.zeros(self.unit_grid, dtype=bool)
        mask[self.top : self.top + self.box_h, self.left : self.left + self.box_w] = True
        return mask


@MASKERS.register("random_blocks")
class RandomBlocksMasker(UnitMasker):
    """Context Encoder's random blocks: rectangles of random size and aspect, possibly
    overlapping, until the count is reached (the last one cut to it in row-major order).

    ``last_blocks`` keeps the rectangles of the most recent sample as
    ``(top, left, h, w, target_area, aspect)``; the tests check them against the bounds.
    """

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.min_area = min(cfg.min_block_patches, self.units_masked)
        self.max_area = max(self.min_area, cfg.max_block_patches or self.units_masked // 4)
        self.log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
        self.last_blocks: list[tuple[int, int, int, int, float, float]] = []

    def sample_units(self, rng: random.Random) -> np.ndarray:
        uh, uw = self.unit_grid
        mask = np.zeros(self.unit_grid, dtype=bool)
        self.last_blocks = []
        count = 0
        while count < self.units_masked:
            area = rng.uniform(self.min_area, self.max_area)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = min(uh, max(1, int(round(math.sqrt(area * aspect)))))
            w = min(uw, max(1, int(round(math.sqrt(area / aspect)))))
            top, left = rng.randint(0, uh - h), rng.randint(0, uw - w)
            box = np.zeros_like(mask)
            box[top : top + h, left : left + w] = True
            new = np.argwhere(box & ~mask)[: self.units_masked - count]
            self.last_blocks.append((top, left, h, w, area, aspect))
            mask[new[:, 0], new[:, 1]] = True
            count += len(new)
        return mask


@MASKERS.register("random_region")
class RandomRegionMasker(UnitMasker):
    """Context Encoder's random region: one connected region of random shape."""

    def sample_units(self, rng: random.Random) -> np.ndarray:
        mask = np.zeros(self.unit_grid, dtype=bool)
        _grow(mask, self.units_masked, rng)
        return mask


@MASKERS.register("grid")
class GridMasker(UnitMasker):
    """MAE's grid-wise sampling: keep one unit of every ``k x k`` cell at a random offset."""

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.k = int(self.plan.k)  # type: ignore[arg-type]

    def sample_units(self, rng: random.Random) -> np.ndarray:
        dy, dx = rng.randrange(self.k), rng.randrange(self.k)
        mask = np.ones(self.unit_grid, dtype=bool)
        mask[dy :: self.k, dx :: self.k] = False
        return mask


@MASKERS.register("ibot_block")
class IBOTBlockMasker(BlockMasker):
    """iBOT's masks: a ratio per image, then BEiT's rectangles up to ``ratio * units`` patches.

    As the reference: the smallest rectangle is ``(min(uh, uw) // 3)^2`` units (16 on ViT-B/16's
    14x14 grid, BEiT's value), ``masking.min_aspect`` bounds the aspect ratio (0.3), and the loop
    stops when ten attempts place nothing, so a sample may fall short of its count (it is not
    grown to it). ``last_ratio`` keeps the ratio of the most recent sample (0 when unmasked).
    """

    per_image_ratio = True

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.min_area = (min(self.unit_grid) // 3) ** 2
        self.last_ratio = 0.0

    def sample_units(self, rng: random.Random) -> np.ndarray:
        mask = np.zeros(self.unit_grid, dtype=bool)
        self.last_blocks = []
        ratio = 0.0
        if rng.random() < self.cfg.mask_prob:
            c = self.cfg
            ratio = rng.uniform(c.ratio - c.ratio_var, c.ratio + c.ratio_var) if c.ratio_var else c.ratio
        self.last_ratio = ratio
        high, count = ratio * self.num_units, 0
        while count < high:  # the reference compares with the fractional count
            delta = self._add_block(mask, high - count, rng)
            if delta == 0:
                break
            count += delta
        return mask


@MASKERS.register("capi_inverse_block")
class CAPIInverseBlockMasker(UnitMasker):
    """CAPI's inverse block: one visible rectangle, cut to the count, randomly rolled.

    ``last_box`` keeps the most recent sample's ``(h, w, aspect, roll_y, roll_x)``.
    """

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        self.log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
        self.last_box: tuple[int, int, float, int, int] = (0, 0, 1.0, 0, 0)

    def sample_units(self, rng: random.Random) -> np.ndarray:
        uh, uw = self.unit_grid
        n_vis = self.num_units - self.units_masked
        # the reference's bounds keep the rectangle inside the grid
        lo = max(self.log_aspect[0], math.log(n_vis / uw**2))
        hi = min(self.log_aspect[1], math.log(uh**2 / (n_vis + 1e-5)))
        aspect = math.exp(rng.uniform(lo, hi))
        h = min(uh, math.ceil(math.sqrt(n_vis * aspect)))
        w = min(uw, max(math.ceil(math.sqrt(n_vis / aspect)), math.ceil(n_vis / h)))
        top, left = rng.randint(0, uh - h), rng.randint(0, uw - w)
        box = np.zeros(self.unit_grid, dtype=bool)
        box[top : top + h, left : left + w] = True
        visible = np.zeros(self.num_units, dtype=bool)
        visible[np.flatnonzero(box)[:n_vis]] = True  # row-major cut to exactly n_vis
        dy, dx = rng.randint(0, uh - 1), rng.randint(0, uw - 1)
        visible = np.roll(visible.reshape(uh, uw), (dy, dx), (0, 1))
        self.last_box = (h, w, aspect, dy, dx)
        return ~visible


@MASKERS.register("d2v2_inverse_block")
class D2V2InverseBlockMasker(UnitMasker):
    """data2vec 2.0's inverse block masking (module docstring).

    ``last_draw`` keeps the most recent sample's ``(centres, visible units before the count was
    made exact)``; the tests check their statistics.
    """

    def __init__(self, cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> None:
        super().__init__(cfg, grid, patch_size)
        share = 1.0 - cfg.ratio + cfg.ratio_adjust
        self.centres = int(self.num_units * share / cfg.block_length**2)
        self.last_draw: tuple[int, int] = (0, 0)

    def _squares(self, rng: random.Random) -> np.ndarray:
        """The union of the squares around ``self.centres`` uniform centres, ``[uh, uw]``."""
        uh, uw = self.unit_grid
        side = self.cfg.block_length
        offsets = np.arange(side) - side // 2  # the reference's i - mask_length // 2
        visible = np.zeros(self.unit_grid, dtype=bool)
        for _ in range(self.centres):
            r, c = divmod(rng.randrange(self.num_units), uw)
            rows = np.clip(r + offsets, 0, uh - 1)
            cols = np.clip(c + offsets, 0, uw - 1)
            visible[np.ix_(rows, cols)] = True
        return visible

    def sample_units(self, rng: random.Random) -> np.ndarray:
        visible = self._squares(rng).reshape(-1)  # [U]
        keep = self.num_units - self.units_masked
        shown = np.flatnonzero(visible)
        self.last_draw = (self.centres, len(shown))
        if len(shown) > keep:  # hide random visible units
            visible[rng.sample(shown.tolist(), len(shown) - keep)] = False
        elif len(shown) < keep:  # show random hidden units
            hidden = np.flatnonzero(~visible).tolist()
            visible[rng.sample(hidden, keep - len(shown))] = True
        return ~visible.reshape(self.unit_grid)


#: Codes of a mask that predicts a subset of its hidden patches (:class:`SubsetMasker`, I-JEPA's
#: multi-block masks): seen by the encoder, hidden and predicted, hidden and not predicted.
#: ``mask != 0`` is what the encoder does not see and ``mask == 1`` what the loss reads, the
#: same tests as for a boolean mask.
VISIBLE, PREDICTED, UNPREDICTED = 0, 1, 2


class SubsetMasker:
    """Predict a random subset of each image's masked patches (CAPI's ``prediction_subsampling``;
    reference: facebookresearch/capi ``data.py``, ``collate_data_and_cast``).

    ``base`` draws the masks; of the ``n`` patches an image predicts (True, or code 1) a uniform
    random ``int(n * fraction)`` keep code 1 and the others become :data:`UNPREDICTED` (still
    hidden from the encoder, no prediction, no loss). The reference draws the subset the same
    way (``int(n_masked * prediction_subsampling)`` per image, a random permutation of the
    masked positions). At least one patch stays predicted in an image that predicts any
    (harness's choice: the reference's counts never round to 0).

    Args:
        base: The recipe's masker.
        fraction: Share of the masked patches predicted, in (0, 1].
    """

    def __init__(self, base: Masker, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"masking.predict_fraction {fraction} is not in (0, 1]")
        self.base = base
        self.fraction = fraction

    @property
    def num_masked(self) -> int:
        """Hidden patches per sample (predicted or not)."""
        return self.base.num_masked

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes ``[B, L]`` (uint8): :data:`VISIBLE`, :data:`PREDICTED`, :data:`UNPREDICTED`."""
        codes = self.base(batch_size, generator=generator).to(torch.uint8)  # [B, L]
        predicted = codes == PREDICTED
        counts = predicted.sum(dim=1).tolist()
        keep = torch.tensor(
            [max(1, int(n * self.fraction)) if n else 0 for n in counts], dtype=torch.long
        )  # [B]
        # a uniform random order of each image's predicted patches: the others sort last
        noise = torch.rand(codes.shape, generator=generator).masked_fill(~predicted, 2.0)
        rank = noise.argsort(dim=1).argsort(dim=1)  # [B, L] place of each patch in that order
        dropped = predicted & (rank >= keep.unsqueeze(1))
        return codes.masked_fill(dropped, UNPREDICTED)


class ViewMasker:
    """Masks for several views of each image: ``[B, V, L]``, each view masked independently by
    ``base`` (iBOT masks each global crop with its own ratio)."""

    def __init__(self, base: Masker | SubsetMasker, views: int) -> None:
        self.base = base
        self.views = views

    @property
    def num_masked(self) -> int:
        return self.base.num_masked

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        mask = self.base(batch_size * self.views, generator=generator)  # [B * V, L]
        return mask.view(batch_size, self.views, -1)


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
