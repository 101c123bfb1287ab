"""Typed configuration: schemas (pydantic v2), YAML loading with one ``extends:`` parent, and
``--set a.b=c`` overrides.

Every schema rejects unknown keys with a did-you-mean. Defaults live in the schemas; the recipe
defaults (SimMIM, MAE) live in :data:`RECIPE_DEFAULTS` and are merged under what the user wrote,
so the resolved config that ``mimbench validate`` prints, and that every run stores, holds every
value that was used.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.core.errors import UserError
from harness.core.registry import Registry, did_you_mean


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


class StrictModel(BaseModel):
    """Base for all schemas: unknown keys are rejected with a did-you-mean."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    #: Fields left out of :func:`hashed_dump` while they hold their default: fields added after
    #: records were written, so that those records' config hashes still match.
    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    hint = did_you_mean(str(key), allowed)
                    raise ValueError(
                        f"unknown key '{key}';{hint} allowed keys: {', '.join(allowed)}"
                    )
        return data


# --------------------------------------------------------------------------- data


class ShapesConfig(StrictModel):
    """Parameters of the embedded synthetic dataset (see :mod:`harness.core.data.shapes`)."""

    image_size: int = Field(32, ge=8)
    train_per_class: int = Field(100, ge=2)
    val_per_class: int = Field(25, ge=1)
    scene_size: int = Field(128, ge=32)
    train_scenes: int = Field(48, ge=1)
    val_scenes: int = Field(16, ge=1)
    max_objects: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)


class DataConfig(StrictModel):
    """Where images come from.

    ``source: shapes`` generates the embedded synthetic dataset on demand into a cache;
    any other value is a path to an ImageFolder root holding ``train/`` and ``val/``.
    """

    source: str = "shapes"
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)
    num_workers: int = Field(0, ge=0)
    eval_crop_pct: float = Field(0.875, gt=0, le=1.0)
    #: Unreadable image files are fatal in every stage reading this data (pretraining and the
    #: tasks; a task's own ``strict_data`` also makes them fatal for that task). Default: skipped,
    #: counted and named on the log.
    strict_data: bool = False

    @model_serializer(mode="wrap")
    def _omit_default_strict(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and pretraining stages were hashed: left out of every dump at its
        # default so their config hashes (which dump the whole data config) stay the same
        out = handler(self)
        if not self.strict_data:
            out.pop("strict_data", None)
        return out


# --------------------------------------------------------------------------- encoder


class EncoderConfig(StrictModel):
    """A ViT encoder: a preset (``arch``) plus optional overrides of its shape.

    ``None`` fields take the preset's value from :data:`ENCODER_PRESETS`; the resolved config
    holds the values used.
    """

    arch: str = "vit_tiny_32"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pos_embed: Literal["sincos", "learned"] = "sincos"
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fill_from_preset(self) -> EncoderConfig:
        if self.arch not in ENCODER_PRESETS:
            hint = did_you_mean(self.arch, list(ENCODER_PRESETS))
            raise ValueError(
                f"unknown encoder arch '{self.arch}';{hint} known: {', '.join(ENCODER_PRESETS)}"
            )
        preset = ENCODER_PRESETS[self.arch]
        for key, value in preset.items():
            # architecture-only preset keys (timm_name, family, Swin's stages) are not fields
            if key in type(self).model_fields and getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.img_size % self.patch_size:  # type: ignore[operator]
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:  # type: ignore[operator]
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def timm_name(self) -> str:
        """The timm model name whose architecture this encoder instantiates (with overrides)."""
        return str(ENCODER_PRESETS[self.arch].get("timm_name") or "")

    @property
    def family(self) -> str:
        """``vit``, ``swin`` or ``conv`` (the Context Encoder's, not a timm model): the
        family in :data:`pretrain.encoders.base.ENCODERS` that builds this preset."""
        return str(ENCODER_PRESETS[self.arch].get("family", "vit"))

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.timm_name, **kwargs)``.

        For Swin, ``depth`` and ``num_heads`` are the totals of the preset's stages: the stage
        depths, stage heads and window size come from the preset (``stage_depths``,
        ``stage_heads``, ``window_size``).
        """
        preset = ENCODER_PRESETS[self.arch]
        if self.family == "swin":
            return {
                "img_size": self.img_size,
                "patch_size": self.patch_size,
                "embed_dim": self.embed_dim,
                "depths": tuple(preset["stage_depths"]),
                "num_heads": tuple(preset["stage_heads"]),
                "window_size": preset["window_size"],
                "mlp_ratio": self.mlp_ratio,
                "num_classes": 0,
            }
        if self.family == "conv":
            return {}
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": 0,
        }


# Encoder presets: tiny ones for CPU (tests, the demo), the standard ViTs for GPUs.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "vit_micro_32": dict(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8,
                         embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "vit_tiny_32": dict(timm_name="vit_tiny_patch16_224", img_size=32, patch_size=4,
                        embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0),
    "vit_tiny_16": dict(timm_name="vit_tiny_patch16_224", img_size=224, patch_size=16,
                        embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small_16": dict(timm_name="vit_small_patch16_224", img_size=224, patch_size=16,
                         embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base_16": dict(timm_name="vit_base_patch16_224", img_size=224, patch_size=16,
                        embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large_16": dict(timm_name="vit_large_patch16_224", img_size=224, patch_size=16,
                         embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    # Swin (Liu et al. 2021) as SimMIM pretrains it: 192 px, window 6, patch 4, stride 32.
    # ``depth``/``num_heads`` are the first stage's totals for the schema; the stages are below.
    "swin_micro_32": dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=32,
                          patch_size=4, embed_dim=16, depth=3, num_heads=1, mlp_ratio=2.0,
                          stage_depths=(1, 1, 1), stage_heads=(1, 2, 4), window_size=4),
    "swin_tiny_192": dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=192,
                          patch_size=4, embed_dim=96, depth=12, num_heads=3, mlp_ratio=4.0,
                          stage_depths=(2, 2, 6, 2), stage_heads=(3, 6, 12, 24), window_size=6),
    "swin_base_192": dict(timm_name="swin_base_patch4_window7_224", family="swin", img_size=192,
                          patch_size=4, embed_dim=128, depth=24, num_heads=4, mlp_ratio=4.0,
                          stage_depths=(2, 2, 18, 2), stage_heads=(4, 8, 16, 32), window_size=6),
    # Context Encoder's convolutional encoder (Pathak et al. 2016): ``depth`` stride-2 4x4 convs
    # ending at ``embed_dim`` channels; ``patch_size`` is the masking unit in pixels.
    "ce_conv_32": dict(family="conv", img_size=32, patch_size=4, embed_dim=64, depth=3,
                       num_heads=1, mlp_ratio=1.0),
    "ce_conv_128": dict(family="conv", img_size=128, patch_size=8, embed_dim=512, depth=5,
                        num_heads=1, mlp_ratio=1.0),
}


# --------------------------------------------------------------------------- recipes


class MaskingConfig(StrictModel):
    """Which patches are hidden (see :mod:`pretrain.masking`).

    Attributes:
        strategy: ``random`` (SimMIM: random units of ``mask_patch_size``), ``shuffle`` (MAE:
            per-token random shuffle), ``block`` (BEiT: random rectangles of at least
            ``min_block_patches``), ``central`` (Context Encoder: the central square),
            ``random_blocks`` (Context Encoder: several smaller, possibly overlapping
            rectangles), ``random_region`` (Context Encoder: one connected region of random
            shape), ``grid`` (MAE Table 1f: keep one unit of every ``k x k``).
        ratio: Fraction of patches masked.
        mask_patch_size: Side of a masking unit in pixels; ``None`` means the model patch size.
        min_block_patches: ``block`` / ``random_blocks``: smallest rectangle, in units (BEiT: 16).
        max_block_patches: Largest rectangle in units; ``None``: all that is left to mask
            (``block``) or a quarter of it (``random_blocks``).
        min_aspect: Rectangles' aspect ratio lies in ``[min_aspect, 1 / min_aspect]`` (BEiT: 0.3).
        mask_token_prob: Of the masked patches, the fraction whose embedding becomes the mask
            token (1.0 everywhere except ViT's masked patch prediction: 0.8).
        random_token_prob: Of the masked patches, the fraction given another patch's embedding
            (ViT masked patch prediction: 0.1); the rest keep their own embedding.
    """

    strategy: Literal[
        "random", "shuffle", "block", "central", "random_blocks", "random_region", "grid"
    ] = "random"
    ratio: float = Field(0.6, gt=0.0, lt=1.0)
    mask_patch_size: int | None = None
    min_block_patches: int = Field(16, ge=1)
    max_block_patches: int | None = Field(None, ge=1)
    min_aspect: float = Field(0.3, gt=0.0, le=1.0)
    mask_token_prob: float = Field(1.0, ge=0.0, le=1.0)
    random_token_prob: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _probs_sum(self) -> MaskingConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mask_token_prob ({self.mask_token_prob}) + random_token_prob "
                f"({self.random_token_prob}) exceeds 1"
            )
        return self


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


#: strategy -> ``(units_masked, rule, extra plan fields)`` on a ``uh x uw`` unit grid.
_UNIT_COUNTS = {
    "random": _count_random,
    "shuffle": _count_shuffle,
    "block": _count_round,
    "random_blocks": _count_round,
    "random_region": _count_round,
    "central": _count_central,
    "grid": _count_grid,
}


def _unit_px(cfg: MaskingConfig, grid: tuple[int, int], patch_size: int) -> int:
    """The masking unit in pixels; raises when it is not whole patches tiling the image."""
    mps = cfg.mask_patch_size
    if cfg.strategy == "shuffle":
        if mps not in (None, patch_size):
            raise ConfigError(
                "shuffle masking works on single patches: set masking.mask_patch_size to null "
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
    if 0 < plan.units_masked < plan.num_units:
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


class HeadConfig(StrictModel):
    """Prediction head (see :mod:`pretrain.heads`).

    Attributes:
        type: ``linear`` (SimMIM: 1x1 conv + pixel shuffle), ``mlp`` (2-layer MLP, SimMIM
            Table 3), ``inverse_swin`` (Swin blocks that upsample back to the patch grid, SimMIM
            Table 3), ``mae_decoder`` (MAE's transformer decoder), ``upconv`` (Context Encoder:
            channel-wise fully connected layer + up-convolutions).
        depth: ``mae_decoder``: blocks; ``inverse_swin``: blocks per stage when
            ``stage_depths`` is not given.
        dim: ``mae_decoder``: width; ``mlp``: hidden width; ``inverse_swin``: width of the
            coarsest stage (halved at every upsampling); ``upconv``: width of the first up-conv.
        num_heads: Attention heads (``inverse_swin``: of the coarsest stage, halved per stage).
        mlp_ratio: MLP ratio of transformer blocks.
        window_size: ``inverse_swin``: attention window.
        stage_depths: ``inverse_swin``: blocks per stage from coarse to fine (SimMIM's
            inverse Swin-T: ``[2, 6, 2, 2]``); one stage per 2x upsampling plus one.
    """

    type: Literal["linear", "mlp", "inverse_swin", "mae_decoder", "upconv"] = "linear"
    depth: int = Field(8, ge=1)
    dim: int = Field(512, ge=8)
    num_heads: int = Field(16, ge=1)
    mlp_ratio: float = 4.0
    window_size: int = Field(7, ge=1)
    stage_depths: list[int] | None = None


class HOGConfig(StrictModel):
    """Histograms of oriented gradients (MaskFeat's target, see :mod:`pretrain.maskfeat`).

    Attributes:
        orientations: Unsigned orientation bins over 180 degrees (MaskFeat: 9).
        cell_size: Cell side in pixels (MaskFeat: 8, so a 16 px patch holds 2x2 cells).
        gradient: ``sobel`` (MaskFeat, reflect-padded) or ``central`` ([-1, 0, 1] differences,
            zero at the image border: Dalal-Triggs and scikit-image).
        gaussian_window: Side of the Gaussian weighting window in pixels, repeated over the
            image (MaskFeat: 16, sigma = window / 2); 0 disables it.
    """

    orientations: int = Field(9, ge=2)
    cell_size: int = Field(8, ge=1)
    gradient: Literal["sobel", "central"] = "sobel"
    gaussian_window: int = Field(16, ge=0)


class TokenizerConfig(StrictModel):
    """Discrete visual tokens for BEiT-style targets (see :mod:`pretrain.tokenizers`).

    Attributes:
        type: ``dall_e`` (DALL-E's dVAE encoder, loaded from ``path``: 8192 tokens on 112 px
            inputs in BEiT), or a tokenizer the harness trains before pretraining: ``kmeans``
            (a k-means codebook over patch pixels, iGPT-style clusters), ``vqvae`` (a small
            VQ-VAE) or ``dvae`` (a small Gumbel-softmax dVAE).
        path: ``dall_e``: the weights (the official ``encoder.pkl`` or a state dict with its
            keys). Other types: optional file of an already trained tokenizer to reuse.
        vocab_size: Number of tokens (DALL-E: 8192).
        input_size: Side of the tokenizer's input in pixels (BEiT: 112 for DALL-E, so 8x
            downsampling gives the 14x14 patch grid); ``None``: the encoder's image size.
        hidden: ``vqvae``/``dvae``: conv width.
        code_dim: ``vqvae``/``dvae``: codebook vector width.
        train_steps: ``vqvae``/``dvae``: optimization steps before pretraining.
        train_images: Images drawn from the training split to fit the tokenizer.
        kmeans_iters: ``kmeans``: Lloyd iterations.
        lr: ``vqvae``/``dvae``: Adam learning rate.
        batch_size: Tokenizer training batch.
    """

    type: Literal["dall_e", "kmeans", "vqvae", "dvae"] = "dall_e"
    path: str | None = None
    vocab_size: int = Field(8192, ge=2)
    input_size: int | None = Field(None, ge=8)
    hidden: int = Field(64, ge=4)
    code_dim: int = Field(32, ge=2)
    train_steps: int = Field(500, ge=0)
    train_images: int = Field(2048, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)


DISCRETE_TARGETS = ("color_bins", "mean_color", "tokens")


class TargetConfig(StrictModel):
    """What the head predicts for each patch (see :mod:`pretrain.targets`).

    Attributes:
        type: ``pixels`` (SimMIM), ``norm_pixels`` (MAE: per-patch normalized), ``hog``
            (MaskFeat), ``color_bins`` (each pixel's channel values in ``bins`` bins: SimMIM
            Table 4's 8-bit color with 256), ``mean_color`` (the patch's mean color with ``bins``
            per channel, one ``bins^3``-way class: ViT's 3-bit color with 8), ``tokens`` (BEiT).
        bins: Color bins per channel for ``color_bins`` and ``mean_color``.
        hog: HOG parameters for ``hog``.
        tokenizer: The tokenizer for ``tokens``.
    """

    type: Literal["pixels", "norm_pixels", "hog", "color_bins", "mean_color", "tokens"] = "pixels"
    bins: int = Field(8, ge=2, le=256)
    hog: HOGConfig = Field(default_factory=HOGConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)


class LossConfig(StrictModel):
    """Loss and where it is averaged.

    Attributes:
        type: ``l1``, ``l2``, ``smooth_l1`` for continuous targets, ``cross_entropy`` for the
            discrete ones (color bins, mean color, tokens).
        on: ``masked`` patches only, or ``all`` patches (SimMIM Table 5).
        adv_weight: Weight of the adversarial loss (Context Encoder: 0.001, the reconstruction
            then weighs ``1 - adv_weight`` = 0.999); 0 disables the discriminator.
    """

    type: Literal["l1", "l2", "smooth_l1", "cross_entropy"] = "l1"
    on: Literal["masked", "all"] = "masked"
    adv_weight: float = Field(0.0, ge=0.0, lt=1.0)


class RecipeConfig(StrictModel):
    """A MIM recipe: masking + encoder mode + head + target + loss.

    The recipe ``name`` selects the paper's defaults from :data:`RECIPE_DEFAULTS`; every key
    given explicitly overrides them, so an ablation changes one value.
    """

    name: str
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    encoder_mode: Literal["mask_token", "visible"] = "mask_token"
    head: HeadConfig = Field(default_factory=HeadConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            name = data["name"]
            if name not in RECIPE_DEFAULTS:
                hint = did_you_mean(str(name), list(RECIPE_DEFAULTS))
                raise ValueError(
                    f"unknown recipe '{name}';{hint} known recipes: {', '.join(RECIPE_DEFAULTS)}"
                )
            return deep_merge(RECIPE_DEFAULTS[name]["recipe"], data)
        return data

    @model_validator(mode="after")
    def _axes_fit_together(self) -> RecipeConfig:
        discrete = self.target.type in DISCRETE_TARGETS
        if discrete and self.loss.type != "cross_entropy":
            raise ValueError(
                f"target '{self.target.type}' is discrete: set loss.type: cross_entropy "
                f"(got '{self.loss.type}')"
            )
        if not discrete and self.loss.type == "cross_entropy":
            raise ValueError(
                f"loss 'cross_entropy' needs a discrete target ({', '.join(DISCRETE_TARGETS)}); "
                f"target '{self.target.type}' is continuous: use l1, l2 or smooth_l1"
            )
        if self.encoder_mode == "visible":
            if self.head.type != "mae_decoder":
                raise ValueError(
                    f"encoder_mode 'visible' leaves masked positions empty; head '{self.head.type}' "
                    "predicts from every encoder token: use head.type: mae_decoder or "
                    "encoder_mode: mask_token"
                )
            if self.masking.mask_token_prob < 1.0 or self.masking.random_token_prob > 0.0:
                raise ValueError(
                    "masking.mask_token_prob / random_token_prob corrupt masked embeddings inside "
                    "the encoder: they need encoder_mode: mask_token"
                )
        if self.loss.adv_weight > 0 and self.target.type not in ("pixels", "norm_pixels"):
            raise ValueError("loss.adv_weight (adversarial loss) needs a pixel target")
        return self


class TrainConfig(StrictModel):
    """Pretraining optimization (AdamW, cosine schedule with linear warmup).

    The learning rate is ``base_lr * batch_size / lr_base_batch`` (MAE: /256; SimMIM: /512).
    """

    epochs: int = Field(100, ge=1)
    warmup_epochs: float = Field(10, ge=0)
    batch_size: int = Field(64, ge=1)
    base_lr: float = Field(1.5e-4, gt=0)
    lr_base_batch: int = Field(256, ge=1)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    ckpt_every_steps: int = Field(200, ge=1)
    log_every_steps: int = Field(20, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_steps: int | None = Field(None, ge=1)
    num_recon_images: int = Field(8, ge=0)


def _recipe_train_defaults(data: Any) -> Any:
    """Put the recipe's paper training defaults under what the user wrote in ``train``."""
    if isinstance(data, dict):
        recipe = data.get("recipe")
        name = recipe.get("name") if isinstance(recipe, dict) else None
        if name in RECIPE_DEFAULTS:
            data = dict(data)
            data["train"] = deep_merge(RECIPE_DEFAULTS[name]["train"], data.get("train") or {})
    return data


class PretrainSpec(StrictModel):
    """How an encoder is pretrained (a suite's ``encoders[i].pretrain``)."""

    recipe: RecipeConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data: Any) -> Any:
        return _recipe_train_defaults(data)


class PretrainConfig(StrictModel):
    """A standalone pretraining run (``mimbench pretrain FILE``)."""

    kind: Literal["pretrain"] = "pretrain"
    name: str = "pretrain"
    seed: int = Field(0, ge=0)
    output_dir: str = "runs/pretrain"
    data: DataConfig = Field(default_factory=DataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    recipe: RecipeConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data: Any) -> Any:
        return _recipe_train_defaults(data)

    @model_validator(mode="after")
    def _masking_fits(self) -> PretrainConfig:
        check_masking_fits(self.recipe.masking, self.encoder, "recipe.masking")
        return self


# --------------------------------------------------------------------------- tasks


class TaskConfig(StrictModel):
    """Base of every downstream task config; ``name`` selects the task."""

    name: str


#: Task name -> config class. Each task module of :mod:`downstream` registers its own schema next
#: to its code (``downstream.base.register_task``); this layer never imports the tasks, so whoever
#: validates a suite imports :mod:`downstream` first (the CLI and the runner do).
TASK_CONFIGS: Registry[type[TaskConfig]] = Registry("task")


def task_config_classes() -> dict[str, type[TaskConfig]]:
    """Task name -> config class, as registered by the task modules."""
    return {name: TASK_CONFIGS.get(name) for name in TASK_CONFIGS.names()}


def parse_task_config(data: Any) -> TaskConfig:
    """Validate one task entry with the config class its ``name`` selects."""
    if isinstance(data, TaskConfig):
        return data
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or "name" not in data:
        raise ValueError("each task needs a 'name', e.g. {name: linear_probe}")
    name = data["name"]
    classes = task_config_classes()
    if not classes:
        raise ValueError(
            "no task is registered: import downstream (it registers every task) before "
            "validating a suite"
        )
    if name not in classes:
        hint = did_you_mean(str(name), list(classes))
        raise ValueError(f"unknown task '{name}';{hint} known tasks: {', '.join(sorted(classes))}")
    return classes[name].model_validate(data)


# --------------------------------------------------------------------------- suites


#: ``checkpoint: "timm:<model name>"`` evaluates a randomly initialized timm architecture.
TIMM_PREFIX = "timm:"

#: Checkpoint format name -> the format (how it is detected, how its keys map onto our encoders).
#: Each format of :mod:`downstream.checkpoints.formats` registers itself here
#: (``downstream.checkpoints.formats.base.register_format``); this layer reads only the names (the
#: values of ``--format`` and of a suite encoder's ``format:`` besides ``auto``), so whoever
#: validates a suite imports :mod:`downstream` first (the CLI and the runner do).
CHECKPOINT_FORMATS: Registry[Any] = Registry("checkpoint format")


def checkpoint_format_names() -> tuple[str, ...]:
    """The registered checkpoint formats, in registration order (the order help texts list)."""
    return tuple(CHECKPOINT_FORMATS.registered())


class EncoderEntry(StrictModel):
    """One encoder of a suite: pretrained here (``pretrain``), loaded (``checkpoint``), or
    randomly initialized (neither: the baseline).

    ``format`` (a format of :data:`CHECKPOINT_FORMATS`, or ``auto``: detected from the keys) and
    ``allow_partial`` (load a checkpoint whose keys do not all match; they are listed in the
    record) say how a ``checkpoint`` file is imported; they apply to files only.
    """

    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ("format", "allow_partial")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    pretrain: PretrainSpec | None = None
    checkpoint: str | None = None
    format: str = "auto"
    allow_partial: bool = False

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        known = ["auto", *checkpoint_format_names()]
        if value not in known:
            if not CHECKPOINT_FORMATS:
                raise ValueError(
                    "no checkpoint format is registered: import downstream (it registers every "
                    "format) before validating a suite"
                )
            raise ValueError(
                f"unknown checkpoint format '{value}';{did_you_mean(value, known)} "
                f"known: {', '.join(known)}"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EncoderEntry:
        if self.pretrain is not None and self.checkpoint is not None:
            raise ValueError(
                f"encoder '{self.name}' has both 'pretrain' and 'checkpoint': keep one"
            )
        given = [k for k in self.HASH_OMIT_DEFAULTS
                 if getattr(self, k) != type(self).model_fields[k].default]
        if given and self.checkpoint is None:
            raise ValueError(
                f"encoder '{self.name}': '{given[0]}' applies to a 'checkpoint' file only; "
                f"this entry has none: remove '{given[0]}'"
            )
        if given and self.checkpoint is not None and self.checkpoint.startswith(TIMM_PREFIX):
            raise ValueError(
                f"encoder '{self.name}': '{given[0]}' does not apply to '{self.checkpoint}' "
                f"(a randomly initialized timm architecture, no file is read): remove '{given[0]}'"
            )
        if self.pretrain is not None:
            masking = self.pretrain.recipe.masking
            check_masking_fits(masking, self.encoder, "pretrain.recipe.masking")
        return self

    @property
    def source(self) -> str:
        if self.pretrain is not None:
            return "pretrain"
        if self.checkpoint is not None:
            return "checkpoint"
        return "random"


class SuiteConfig(StrictModel):
    """A benchmark: encoders x tasks x seeds (``mimbench run FILE``)."""

    kind: Literal["suite"] = "suite"
    name: str = Field("suite", pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "runs"
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    encoders: list[EncoderEntry] = Field(min_length=1)
    tasks: list[SerializeAsAny[TaskConfig]] = Field(min_length=1)

    @field_validator("tasks", mode="before")
    @classmethod
    def _parse_tasks(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("'tasks' must be a list of task entries")
        return [parse_task_config(v) for v in value]

    @model_validator(mode="after")
    def _unique_encoder_names(self) -> SuiteConfig:
        names = [e.name for e in self.encoders]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"encoder names must be unique; repeated: {', '.join(dup)}")
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds must be distinct (a repeated seed is the same run); "
                             f"repeated: {', '.join(map(str, repeated))}")
        return self


CONFIG_KINDS: dict[str, type[StrictModel]] = {"suite": SuiteConfig, "pretrain": PretrainConfig}


# --------------------------------------------------------------------------- recipe defaults

RECIPE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # SimMIM (Xie et al., CVPR 2022): random masking of 32 px units on 16 px patches at ratio 0.6,
    # mask token in the encoder, a linear head, L1 on the masked pixels (Tables 1-4; Sec. 4.1:
    # AdamW, base lr 8e-4 for batch 2048 scaled linearly per 512, wd 0.05, betas (0.9, 0.999),
    # 100 epochs with 10 warmup, crops of scale [0.67, 1]).
    "simmim": {
        "recipe": {
            "masking": {"strategy": "random", "ratio": 0.6, "mask_patch_size": 32},
            "encoder_mode": "mask_token",
            "head": {"type": "linear"},
            "target": {"type": "pixels"},
            "loss": {"type": "l1", "on": "masked"},
        },
        "train": {
            "base_lr": 8e-4 * 512 / 2048,
            "lr_base_batch": 512,
            "weight_decay": 0.05,
            "betas": (0.9, 0.999),
            "epochs": 100,
            "warmup_epochs": 10,
            "crop_scale": (0.67, 1.0),
            "clip_grad": 5.0,
        },
    },
    # MAE (He et al., CVPR 2022): per-sample random shuffle masking at 0.75, encoder on visible
    # tokens only, 8-block 512-wide decoder, MSE on per-patch normalized pixels of masked patches
    # (Table 1; appendix A.1: AdamW, base lr 1.5e-4 per 256, wd 0.05, betas (0.9, 0.95),
    # 40 warmup epochs for 800-1600 epochs, RandomResizedCrop scale [0.2, 1]).
    "mae": {
        "recipe": {
            "masking": {"strategy": "shuffle", "ratio": 0.75, "mask_patch_size": None},
            "encoder_mode": "visible",
            "head": {"type": "mae_decoder", "depth": 8, "dim": 512, "num_heads": 16},
            "target": {"type": "norm_pixels"},
            "loss": {"type": "l2", "on": "masked"},
        },
        "train": {
            "base_lr": 1.5e-4,
            "lr_base_batch": 256,
            "weight_decay": 0.05,
            "betas": (0.9, 0.95),
            "epochs": 800,
            "warmup_epochs": 40,
            "crop_scale": (0.2, 1.0),
        },
    },
    # BEiT (Bao et al., ICLR 2022): block-wise masking of ~40 % (75 of 196 patches, blocks of at
    # least 16 patches with aspect ratio in [0.3, 1/0.3]), mask token in the encoder, a linear
    # head predicting DALL-E dVAE tokens (8192, from 112 px inputs) with cross-entropy on the
    # masked positions (Sec. 2; appendix: Adam betas (0.9, 0.999), lr 1.5e-3 at batch 2048,
    # wd 0.05, 10 warmup epochs, gradient clipping 3.0, crops of scale [0.08, 1]).
    "beit": {
        "recipe": {
            "masking": {"strategy": "block", "ratio": 75 / 196, "mask_patch_size": None,
                        "min_block_patches": 16, "min_aspect": 0.3},
            "encoder_mode": "mask_token",
            "head": {"type": "linear"},
            "target": {"type": "tokens",
                       "tokenizer": {"type": "dall_e", "vocab_size": 8192, "input_size": 112}},
            "loss": {"type": "cross_entropy", "on": "masked"},
        },
        "train": {
            "base_lr": 1.5e-3,
            "lr_base_batch": 2048,
            "weight_decay": 0.05,
            "betas": (0.9, 0.999),
            "epochs": 800,
            "warmup_epochs": 10,
            "crop_scale": (0.08, 1.0),
            "clip_grad": 3.0,
        },
    },
    # MaskFeat (Wei et al., CVPR 2022), image version: block-wise masking of 40 %, mask token,
    # a linear head regressing HOG (9 orientations, 8x8 cells, per RGB channel, Sobel gradients,
    # Gaussian window 16) of the masked patches with L2. Train values follow the public
    # reproduction in mmselfsup (lr 2e-4 per 256, betas (0.9, 0.999), wd 0.05, crops [0.5, 1]),
    # not the paper's tables.
    "maskfeat": {
        "recipe": {
            "masking": {"strategy": "block", "ratio": 0.4, "mask_patch_size": None,
                        "min_block_patches": 16, "min_aspect": 0.3},
            "encoder_mode": "mask_token",
            "head": {"type": "linear"},
            "target": {"type": "hog", "hog": {"orientations": 9, "cell_size": 8,
                                              "gradient": "sobel", "gaussian_window": 16}},
            "loss": {"type": "l2", "on": "masked"},
        },
        "train": {
            "base_lr": 2e-4,
            "lr_base_batch": 256,
            "weight_decay": 0.05,
            "betas": (0.9, 0.999),
            "epochs": 300,
            "warmup_epochs": 30,
            "crop_scale": (0.5, 1.0),
        },
    },
    # ViT masked patch prediction (Dosovitskiy et al., ICLR 2021, appendix B.1.2): corrupt 50 %
    # of the patch embeddings (80 % mask token, 10 % another patch's embedding, 10 % kept) and
    # classify each corrupted patch's 3-bit mean color (512 classes). Adam, base lr 2e-4 at
    # batch 4096 with cosine decay.
    "vit_mpp": {
        "recipe": {
            "masking": {"strategy": "shuffle", "ratio": 0.5, "mask_patch_size": None,
                        "mask_token_prob": 0.8, "random_token_prob": 0.1},
            "encoder_mode": "mask_token",
            "head": {"type": "linear"},
            "target": {"type": "mean_color", "bins": 8},
            "loss": {"type": "cross_entropy", "on": "masked"},
        },
        "train": {
            "base_lr": 2e-4,
            "lr_base_batch": 4096,
            "betas": (0.9, 0.999),
        },
    },
    # Context Encoder (Pathak et al., CVPR 2016): a convolutional encoder (preset ce_conv_128),
    # a channel-wise fully connected bottleneck and up-convolutions predicting the pixels of the
    # central square (a quarter of the image), L2 on the hole plus an adversarial loss with
    # weights 0.999 / 0.001; Adam (lr 2e-4, beta1 0.5) as in DCGAN, batch 64.
    "context_encoder": {
        "recipe": {
            "masking": {"strategy": "central", "ratio": 0.25, "mask_patch_size": None},
            "encoder_mode": "mask_token",
            "head": {"type": "upconv", "dim": 512},
            "target": {"type": "pixels"},
            "loss": {"type": "l2", "on": "masked", "adv_weight": 0.001},
        },
        "train": {
            "base_lr": 2e-4,
            "lr_base_batch": 64,
            "weight_decay": 0.0,
            "betas": (0.5, 0.999),
            "warmup_epochs": 0,
        },
    },
}


# --------------------------------------------------------------------------- loading


def deep_merge(base: Any, override: Any) -> Any:
    """Merge ``override`` over ``base``: dicts merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = deep_merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def load_yaml_with_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, merging it over its single optional ``extends:`` parent.

    The parent path is relative to the file that names it. Chains are allowed, cycles are not.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"'extends' cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(
            f"{path}: 'extends' takes one file path (a string); multiple parents are not supported"
        )
    base = load_yaml_with_extends(path.parent / parent, (*_seen, path))
    return deep_merge(base, data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides; values are parsed as YAML (numbers, bools, lists).

    List elements are addressed by index: ``tasks.0.epochs=10``.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: i + 1], item, create=True)
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(node, last, item)
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(parts[:-1])}' is not a mapping")
    return data


def _index(node: list[Any], part: str, item: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(f"override '{item}': '{part}' is not a valid index of a list of {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: list[str], item: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, item)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            if not create:
                raise ConfigError(f"override '{item}': no key '{'.'.join(path)}'")
            node[part] = {}
        return node[part]
    raise ConfigError(f"override '{item}': '{'.'.join(path[:-1])}' is not a mapping")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: path.to.key: message``."""
    lines = [f"{source}: invalid config ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "config", kind: str | None = None) -> StrictModel:
    """Validate a raw mapping as the schema named by ``kind`` or by its ``kind:`` key."""
    kind = kind or data.get("kind")
    if kind is None:
        raise ConfigError(
            f"{source}: missing 'kind:' at the top level; use one of: {', '.join(CONFIG_KINDS)}"
        )
    if kind not in CONFIG_KINDS:
        hint = did_you_mean(str(kind), list(CONFIG_KINDS))
        raise ConfigError(f"{source}: unknown kind '{kind}';{hint} use one of: {', '.join(CONFIG_KINDS)}")
    try:
        return CONFIG_KINDS[kind].model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None
) -> StrictModel:
    """Load, merge ``extends``, apply overrides and validate a config file."""
    data = apply_overrides(load_yaml_with_extends(path), overrides)
    return validate_config(data, source=str(path), kind=kind)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what ``mimbench validate`` prints)."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def hashed_dump(cfg: StrictModel) -> dict[str, Any]:
    """``model_dump(mode="json")`` less the fields of ``cfg.HASH_OMIT_DEFAULTS`` that hold their
    default (what run configs store and hash: see :func:`harness.runner.run_config_for`)."""
    fields = type(cfg).model_fields
    omit = {k for k in cfg.HASH_OMIT_DEFAULTS if getattr(cfg, k) == fields[k].default}
    return cfg.model_dump(mode="json", exclude=omit or None)


def to_plain(cfg: BaseModel) -> dict[str, Any]:
    """JSON-compatible dict of a config (tuples become lists)."""
    return cfg.model_dump(mode="json")
