"""Which patches are hidden (:class:`MaskingConfig`) and the plan of a mask on a patch grid
(:func:`plan_masking`): one rule for :mod:`pretrain.masking` and for config validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.core.config.axes import MASKERS, check_name
from harness.core.config.base import ConfigError, StrictModel, omit_at_default
from harness.core.config.encoder import EncoderConfig
from harness.core.registry import did_you_mean


class MultiBlockConfig(StrictModel):
    """I-JEPA's multi-block masks (``strategy: multiblock``, :mod:`pretrain.ijepa`): per image
    ``num_targets`` target blocks and one context block minus the targets.

    Attributes:
        context_scale: The context block's share of the grid, drawn per batch (I-JEPA
            ``enc_mask_scale`` [0.85, 1.0]; square, as the reference's aspect (1, 1)).
        target_scale: Each target block's share of the grid, drawn per batch (``pred_mask_scale``
            [0.15, 0.2]).
        aspect: Target blocks' height / width, drawn per batch (``aspect_ratio`` [0.75, 1.5]).
        num_targets: Target blocks per image (``num_pred_masks`` 4).
        min_context: Fewest context patches an image may keep (``min_keep`` 10): a context
            block with fewer left after removing the targets is drawn again.
    """

    context_scale: tuple[float, float] = (0.85, 1.0)
    target_scale: tuple[float, float] = (0.15, 0.2)
    aspect: tuple[float, float] = (0.75, 1.5)
    num_targets: int = Field(4, ge=1)
    min_context: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> MultiBlockConfig:
        for name in ("context_scale", "target_scale", "aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi or (name != "aspect" and hi > 1):
                bound = "0 < low <= high" + ("" if name == "aspect" else " <= 1")
                raise ValueError(f"multiblock.{name} ({lo}, {hi}) needs {bound}")
        return self


class MaskingConfig(StrictModel):
    """Which patches are hidden (see :mod:`pretrain.masking`); ``strategy`` is a name registered
    in :data:`harness.core.config.axes.MASKERS`.

    Attributes:
        strategy: ``random`` (SimMIM: random units of ``mask_patch_size``), ``shuffle`` (MAE:
            per-token random shuffle), ``block`` (BEiT: random rectangles of at least
            ``min_block_patches``), ``central`` (Context Encoder: the central square),
            ``random_blocks`` (Context Encoder: several smaller, possibly overlapping
            rectangles), ``random_region`` (Context Encoder: one connected region of random
            shape), ``grid`` (MAE Table 1f: keep one unit of every ``k x k``), ``multiblock``
            (I-JEPA: context block minus target blocks, see ``multiblock``; ``ratio`` unused),
            ``ibot_block`` (iBOT: BEiT-style blocks up to a ratio drawn per image, so the count
            varies), ``capi_inverse_block`` (CAPI: one visible rectangle, randomly rolled),
            ``d2v2_inverse_block`` (data2vec 2.0: the visible patches are squares of
            ``block_length`` at random centres, the count made exact).
        ratio: Fraction of patches masked (``ibot_block``: the middle of the per-image range).
        mask_patch_size: Side of a masking unit in pixels; ``None`` means the model patch size.
        min_block_patches: ``block`` / ``random_blocks``: smallest rectangle, in units (BEiT: 16).
        max_block_patches: Largest rectangle in units; ``None``: all that is left to mask
            (``block``) or a quarter of it (``random_blocks``).
        min_aspect: Rectangles' aspect ratio lies in ``[min_aspect, 1 / min_aspect]`` (BEiT: 0.3).
        mask_token_prob: Of the masked patches, the fraction whose embedding becomes the mask
            token (1.0 everywhere except ViT's masked patch prediction: 0.8).
        random_token_prob: Of the masked patches, the fraction given another patch's embedding
            (ViT masked patch prediction: 0.1); the rest keep their own embedding.
        multiblock: ``multiblock``'s blocks; left out of dumps at its default (hashes kept).
        ratio_var: ``ibot_block``: each image's ratio is drawn uniformly from
            ``[ratio - ratio_var, ratio + ratio_var]`` (iBOT: 0.3 +- 0.2, ``pred_ratio_var``).
        mask_prob: ``ibot_block``: the probability that an image is masked at all (iBOT's
            ImageNet runs: 0.5, ``--pred_ratio 0 0.3`` picks 0 or the range at random).
        block_length: ``d2v2_inverse_block``: side in units of each visible square (data2vec
            2.0's ``mask_length`` 3); at least 2.
        ratio_adjust: ``d2v2_inverse_block``: added to the visible share when the number of
            squares is drawn, to make up for their overlap (data2vec 2.0's
            ``mask_prob_adjust`` 0.07).
        predict_fraction: Share of each image's masked patches that the head predicts and the
            loss reads, a uniform random subset (CAPI's ``prediction_subsampling`` 0.05); the
            others stay hidden from the encoder (:class:`pretrain.masking.SubsetMasker`). 1:
            every masked patch. Only heads that build their predictions at the predicted
            positions take less than 1 (their class's ``predicts_subset``).

    ``multiblock``, ``ratio_var``, ``mask_prob``, ``block_length``, ``ratio_adjust`` and
    ``predict_fraction`` are left out of dumps at their defaults (hashes kept).
    """

    strategy: str = "random"
    ratio: float = Field(0.6, gt=0.0, lt=1.0)
    mask_patch_size: int | None = None
    min_block_patches: int = Field(16, ge=1)
    max_block_patches: int | None = Field(None, ge=1)
    min_aspect: float = Field(0.3, gt=0.0, le=1.0)
    mask_token_prob: float = Field(1.0, ge=0.0, le=1.0)
    random_token_prob: float = Field(0.0, ge=0.0, le=1.0)
    ratio_var: float = Field(0.0, ge=0.0, lt=0.5)
    mask_prob: float = Field(1.0, gt=0.0, le=1.0)
    multiblock: MultiBlockConfig = Field(default_factory=MultiBlockConfig)
    block_length: int = Field(3, ge=2)
    ratio_adjust: float = Field(0.0, ge=0.0, lt=1.0)
    predict_fraction: float = Field(1.0, gt=0.0, le=1.0)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        return check_name(MASKERS, value)

    @model_validator(mode="after")
    def _probs_sum(self) -> MaskingConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mask_token_prob ({self.mask_token_prob}) + random_token_prob "
                f"({self.random_token_prob}) exceeds 1"
            )
        lo, hi = self.ratio - self.ratio_var, self.ratio + self.ratio_var
        if self.ratio_var > 0 and not 0.0 < lo < hi < 1.0:
            raise ValueError(
                f"ratio_var {self.ratio_var} with ratio {self.ratio} draws ratios outside (0, 1): "
                "lower ratio_var or move ratio"
            )
        per_image = bool(MASKERS.get(self.strategy).per_image_ratio)
        if (self.ratio_var > 0 or self.mask_prob < 1.0) and not per_image:
            takes = [n for n in MASKERS.names() if MASKERS.get(n).per_image_ratio]
            raise ValueError(
                f"masking.ratio_var {self.ratio_var} / mask_prob {self.mask_prob} draw a ratio per "
                f"image; strategy '{self.strategy}' masks the same count in every image: use "
                f"strategy: {' or '.join(takes)}, or ratio_var: 0 and mask_prob: 1"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_new_keys_at_default(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after configs were hashed: left out of dumps at their defaults (hashes kept)
        names = (
            "multiblock", "ratio_var", "mask_prob", "block_length", "ratio_adjust",
            "predict_fraction",
        )  # fmt: skip
        return omit_at_default(self, handler(self), names)


@dataclass(frozen=True)
class MaskPlan:
    """Where a masking config puts its units on an image and how many it masks per sample.

    One rule for :mod:`pretrain.masking`, which draws the masks, and for config validation,
    which rejects a mask that hides every patch or none before anything runs
    (:func:`plan_masking`).

    Attributes:
        strategy: The masking strategy.
        ratio: The configured fraction of patches to mask.
        patch_px: Side of a model patch in pixels.
        unit_px: Side of a masking unit in pixels (a multiple of ``patch_px``).
        grid: Patch grid ``(gh, gw)``.
        unit_grid: Unit grid ``(uh, uw)``.
        units_masked: Units masked in every sample.
        rule: How ``units_masked`` follows from the ratio, for messages (``ceil(0.6 x 16)``).
        box: ``central``: the masked rectangle ``(h, w)`` in units.
        k: ``grid``: one unit of every ``k x k`` stays visible.
    """

    strategy: str
    ratio: float
    patch_px: int
    unit_px: int
    grid: tuple[int, int]
    unit_grid: tuple[int, int]
    units_masked: int
    rule: str
    box: tuple[int, int] | None = None
    k: int | None = None

    @property
    def scale(self) -> int:
        """Patches per unit side."""
        return self.unit_px // self.patch_px

    @property
    def num_units(self) -> int:
        return self.unit_grid[0] * self.unit_grid[1]

    @property
    def num_masked(self) -> int:
        """Masked patches per sample."""
        return self.units_masked * self.scale * self.scale

    def describe(self) -> str:
        """The numbers: image, unit, unit grid, ratio and the masked count."""
        (gh, gw), (uh, uw) = self.grid, self.unit_grid
        return (
            f"'{self.strategy}' masking of {self.unit_px} px units on a {gh * self.patch_px}x"
            f"{gw * self.patch_px} px image ({self.patch_px} px patches) has a {uh}x{uw} grid of "
            f"{self.num_units} unit(s); ratio {self.ratio:g} masks {self.rule} = "
            f"{self.units_masked} of them"
        )


def _count_random(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # SimMIM: mask_count = ceil(token_count * ratio)
    return int(math.ceil(uh * uw * cfg.ratio)), f"ceil({cfg.ratio:g} x {uh * uw})", {}


def _count_shuffle(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # MAE: len_keep = int(L * (1 - ratio)), the rest is masked
    n = uh * uw
    return n - int(n * (1 - cfg.ratio)), f"{n} - int({n} x (1 - {cfg.ratio:g}))", {}


def _count_round(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # BEiT: num_masking_patches = round(ratio * units)
    return round(uh * uw * cfg.ratio), f"round({cfg.ratio:g} x {uh * uw})", {}


def _count_int(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # CAPI: n_masked = int(n_tokens * mask_ratio)
    return int(uh * uw * cfg.ratio), f"int({cfg.ratio:g} x {uh * uw})", {}


def _count_central(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # a centered box of sqrt(ratio) of each side
    side = math.sqrt(cfg.ratio)
    bh, bw = round(side * uh), round(side * uw)
    rule = f"round(sqrt({cfg.ratio:g}) x {uh}) x round(sqrt({cfg.ratio:g}) x {uw})"
    return bh * bw, rule, {"box": (bh, bw)}


def _count_grid(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # MAE Table 1f: one unit of every k x k stays visible
    k = max(2, round(1.0 / math.sqrt(1.0 - cfg.ratio)))
    if abs(1.0 - 1.0 / k**2 - cfg.ratio) > 0.02:
        raise ConfigError(
            f"grid masking keeps one unit of every k x k, so its ratio is 1 - 1/k^2 "
            f"(0.75, 0.889, 0.9375, ...); {cfg.ratio} is not one of them"
        )
    if uh % k or uw % k:
        raise ConfigError(
            f"grid masking with k={k} needs a unit grid divisible by {k}, got {uh}x{uw}"
        )
    return uh * uw - (uh // k) * (uw // k), f"{uh * uw} - {uh // k} x {uw // k}", {"k": k}


def _count_all(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # iGPT's autoregressive objective: every unit is predicted from the ones before it
    return uh * uw, f"all {uh * uw} (each from the ones before it in raster order)", {}


def _count_multiblock(cfg: MaskingConfig, uh: int, uw: int) -> tuple[int, str, dict[str, Any]]:
    # I-JEPA: the targets vary per image; the plan holds the largest count of one target block
    mb = cfg.multiblock
    n = max(1, int(uh * uw * mb.target_scale[1]))
    return min(n, uh * uw - 1), f"int({mb.target_scale[1]:g} x {uh * uw}) per target block", {}


#: strategy -> ``(units_masked, rule, extra plan fields)`` on a ``uh x uw`` unit grid.
_UNIT_COUNTS = {
    "random": _count_random,
    "shuffle": _count_shuffle,
    "block": _count_round,
    "random_blocks": _count_round,
    "random_region": _count_round,
    "central": _count_central,
    "grid": _count_grid,
    "ibot_block": _count_round,  # the count of the middle ratio; each image draws its own
    "capi_inverse_block": _count_int,
    "d2v2_inverse_block": _count_shuffle,  # data2vec 2.0: int(L x (1 - ratio)) stay visible
    "multiblock": _count_multiblock,
    "bernoulli": _count_round,  # the expected count; each unit is drawn on its own
    "raster": _count_all,
}

#: Strategies that predict every unit, each from the ones before it (causal attention), so a
#: mask hiding every unit is their design, not an error.
PREDICT_ALL = frozenset({"raster"})


def _unit_px(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> int:
    """The masking unit in pixels; raises when it is not whole patches tiling the image."""
    mps = cfg.mask_patch_size
    if cfg.strategy in ("shuffle", "bernoulli", *PREDICT_ALL):
        if mps not in (None, patch_size):
            raise ConfigError(
                f"{cfg.strategy} masking works on single patches: set masking.mask_patch_size to null "
                f"(got {mps} with patch size {patch_size})"
            )
        return patch_size
    mps = mps or patch_size
    if mps < patch_size or mps % patch_size:
        raise ConfigError(
            f"mask_patch_size {mps} must be a multiple of the model patch size {patch_size}"
        )
    scale = mps // patch_size
    if grid[0] % scale or grid[1] % scale:
        raise ConfigError(
            f"mask_patch_size {mps} does not tile the {grid[0] * patch_size}x"
            f"{grid[1] * patch_size} image; use a divisor of the image size"
        )
    return mps


def _plan(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> MaskPlan:
    """:func:`plan_masking` without the check that the count is neither 0 nor all."""
    if cfg.strategy not in _UNIT_COUNTS:
        hint = did_you_mean(cfg.strategy, list(_UNIT_COUNTS))
        raise ConfigError(f"masking strategy '{cfg.strategy}' has no count rule;{hint}")
    unit = _unit_px(cfg, grid, patch_size)
    scale = unit // patch_size
    uh, uw = grid[0] // scale, grid[1] // scale
    count, rule, extra = _UNIT_COUNTS[cfg.strategy](cfg, uh, uw)
    gh, gw = grid
    return MaskPlan(cfg.strategy, cfg.ratio, patch_size, unit, (gh, gw), (uh, uw), count, rule,
                    **extra)


def _fits(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> bool:
    try:
        plan = _plan(cfg, grid, patch_size)
    except ConfigError:
        return False
    return 0 < plan.units_masked < plan.num_units


def _masking_fix(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int, where: str) -> str:
    """What to change so that the mask hides some patches but not all: the unit sizes and the
    ratios (with the other value kept) that do."""
    units = [] if cfg.strategy == "shuffle" else [
        s * patch_size for s in range(1, min(grid) + 1)
        if s * patch_size != cfg.mask_patch_size
        and _fits(cfg.model_copy(update={"mask_patch_size": s * patch_size}), grid, patch_size)
    ]
    grid_ratios = [round(1 - 1 / k**2, 4) for k in range(2, 9)]
    ratios = [r for r in sorted({*(i / 20 for i in range(1, 20)), *grid_ratios})
              if r != cfg.ratio and _fits(cfg.model_copy(update={"ratio": r}), grid, patch_size)]
    fixes = []
    if units:
        fixes.append(f"set {where}.mask_patch_size to {' or '.join(map(str, units))}")
    if ratios:
        shown = ", ".join(f"{r:g}" for r in ratios) if len(ratios) <= 4 else (
            f"a value from {ratios[0]:g} to {ratios[-1]:g}")
        fixes.append(f"set {where}.ratio to {shown}")
    return " or ".join(fixes) or "use a larger image (encoder.img_size) or smaller patches"


def plan_masking(
    cfg: MaskingConfig, grid: tuple[int, int], patch_size: int, where: str = "masking"
) -> MaskPlan:
    """The masking units of ``cfg`` on a ``grid`` of ``patch_size`` px patches, checked.

    Args:
        cfg: The masking config.
        grid: Patch grid ``(gh, gw)`` of the encoder.
        patch_size: Model patch side in pixels (the Context Encoder's: its masking unit).
        where: The config path of ``cfg``, for messages (``recipe.masking``).

    Raises:
        ConfigError: The unit is not whole patches tiling the image, the strategy cannot make
            the ratio on this grid, or the mask would hide every patch or none (the message
            gives the numbers and the values that work).
    """
    try:
        plan = _plan(cfg, grid, patch_size)
    except ConfigError as exc:
        numbers = (f"{cfg.strategy} masking at ratio {cfg.ratio:g} on a {grid[0] * patch_size}x"
                   f"{grid[1] * patch_size} px image of {patch_size} px patches")
        fix = _masking_fix(cfg, grid, patch_size, where)
        raise ConfigError(f"{where}: {exc} ({numbers}); {fix}") from None
    if 0 < plan.units_masked < plan.num_units or cfg.strategy in PREDICT_ALL:
        return plan
    what = ("every patch of every sample is masked, nothing is left to predict from"
            if plan.units_masked >= plan.num_units else "no patch is masked, nothing to predict")
    raise ConfigError(
        f"{where}: {plan.describe()}: {what}; {_masking_fix(cfg, grid, patch_size, where)}"
    )


def check_masking_fits(masking: MaskingConfig, encoder: EncoderConfig, where: str) -> MaskPlan:
    """:func:`plan_masking` on the square patch grid of an encoder config."""
    patch = int(encoder.patch_size)  # type: ignore[arg-type]
    side = int(encoder.img_size) // patch  # type: ignore[arg-type]
    return plan_masking(masking, (side, side), patch, where)
