"""Pretraining: the optimization schema (:class:`TrainConfig`), a suite encoder's ``pretrain``
block and a standalone pretraining config; the recipe file's train block lies under both."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from harness.core.config.axes import HEADS
from harness.core.config.base import ConfigError, StrictModel
from harness.core.config.data import DataConfig
from harness.core.config.encoder import EncoderConfig
from harness.core.config.masking import check_masking_fits
from harness.core.config.recipe import RecipeConfig
from harness.core.config.recipe_files import recipe_train_defaults


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


class PretrainSpec(StrictModel):
    """How an encoder is pretrained (a suite's ``encoders[i].pretrain``)."""

    recipe: RecipeConfig
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data: Any) -> Any:
        return recipe_train_defaults(data)


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
        return recipe_train_defaults(data)

    @model_validator(mode="after")
    def _masking_fits(self) -> PretrainConfig:
        check_masking_fits(self.recipe.masking, self.encoder, "recipe.masking")
        check_head_width(self.recipe, self.encoder)
        return self


def check_head_width(recipe: RecipeConfig, encoder: EncoderConfig) -> None:
    """A narrow head (I-JEPA's predictor, its class's ``narrow``) may not be wider than the
    encoder.

    Raises:
        ConfigError: ``recipe.head.dim`` exceeds ``encoder.embed_dim``.
    """
    width = int(encoder.embed_dim)  # type: ignore[arg-type]
    if HEADS.get(recipe.head.type).narrow and recipe.head.dim > width:
        raise ConfigError(
            f"recipe.head.dim {recipe.head.dim} is wider than the encoder ({encoder.arch}: "
            f"embed_dim {width}); head '{recipe.head.type}' is a bottleneck: set recipe.head.dim "
            f"to at most {width} (I-JEPA: 384 for ViT-H's 1280)"
        )

