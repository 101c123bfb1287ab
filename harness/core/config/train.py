"""Pretraining: the optimization schema (:class:`TrainConfig`), a suite encoder's ``pretrain``
block and a standalone pretraining config; the recipe file's train block lies under both."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from harness.core.config.axes import ENCODER_INITS
from harness.core.config.base import ConfigError, StrictModel, omit_at_default
from harness.core.config.data import DataConfig
from harness.core.config.encoder import ENCODER_PRESETS, VARIANT_FIELDS, EncoderConfig
from harness.core.config.masking import check_masking_fits
from harness.core.config.recipe import RecipeConfig, check_encoder_fits
from harness.core.config.recipe_files import recipe_train_defaults


class TrainConfig(StrictModel):
    """Pretraining optimization (AdamW, cosine schedule with linear warmup).

    The learning rate is ``base_lr * batch_size / lr_base_batch`` (MAE: /256; SimMIM: /512).

    Compute and memory (:mod:`pretrain.engine`; left out of dumps and hashes at their defaults,
    so configs hashed before they existed keep their hashes):

    Attributes:
        accum_steps: Micro-batches per optimizer step of each process's batch (gradient
            accumulation, MAE's ``accum_iter``); the step's gradient is the whole batch's, the
            lr schedule counts optimizer steps.
        compile: ``torch.compile`` the model's forward and backward (inductor); when
            compilation fails the run continues eagerly with one warning naming the error.
        fsdp: Shard parameters, gradients and optimizer state over the ranks (PyTorch's
            ``fully_shard``, one unit per transformer block) instead of DistributedDataParallel;
            checkpoints still hold full state dicts.
        activation_checkpointing: Recompute each transformer block's activations in the
            backward pass instead of storing them.
        nonfinite: What a non-finite loss does: ``stop`` (raise, naming the step), ``skip`` (no
            update this step, counted), ``restore`` (reload the last checkpoint and multiply the
            lr by ``nonfinite_lr_factor``).
        nonfinite_lr_factor: The lr multiplier of each ``restore`` event.
        nonfinite_max_events: Consecutive non-finite events (no finite step between) after which
            ``skip`` and ``restore`` give up with the ``stop`` error.
    """

    #: Added after pretraining stages were hashed: dropped from dumps while at their default.
    OMIT_AT_DEFAULT: ClassVar[tuple[str, ...]] = (
        "accum_steps", "compile", "fsdp", "activation_checkpointing", "nonfinite",
        "nonfinite_lr_factor", "nonfinite_max_events",
    )  # fmt: skip

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
    accum_steps: int = Field(1, ge=1)
    compile: bool = False
    fsdp: bool = False
    activation_checkpointing: bool = False
    nonfinite: Literal["stop", "skip", "restore"] = "stop"
    nonfinite_lr_factor: float = Field(0.5, gt=0, lt=1)
    nonfinite_max_events: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _accum_fits_batch(self) -> TrainConfig:
        if self.accum_steps > self.batch_size:
            raise ValueError(
                f"accum_steps={self.accum_steps} is more than batch_size={self.batch_size}: a "
                "micro-batch needs at least one image; lower train.accum_steps"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return omit_at_default(self, handler(self), self.OMIT_AT_DEFAULT)


def resolve_encoder(encoder: EncoderConfig, recipe: RecipeConfig) -> EncoderConfig:
    """The encoder a recipe pretrains: ``recipe.encoder_defaults`` (the paper's definition)
    filled into the fields the user left unset, on ViT presets (a Swin or conv encoder keeps its
    own definition); then checked against the recipe.

    Raises:
        ValueError: the recipe's ``encoder_init`` is not defined for the encoder's family, or
            MAE's visible-only encoding meets a relative position bias (defined over the grid).
    """
    defaults = recipe.encoder_defaults.given() if recipe.encoder_defaults is not None else {}
    is_vit = ENCODER_PRESETS[encoder.arch].get("family", "vit") == "vit"
    fill = {k: v for k, v in defaults.items() if k not in encoder.model_fields_set}
    if fill and is_vit:
        given = {k: getattr(encoder, k) for k in encoder.model_fields_set}
        encoder = EncoderConfig.model_validate({**given, **fill})
    ENCODER_INITS.get(recipe.encoder_init).check_family(recipe.encoder_init, encoder.family)
    if recipe.encoder_mode == "visible" and encoder.rel_pos_bias != "none":
        raise ValueError(
            f"encoder_mode 'visible' (MAE) encodes the visible patches alone, but the encoder has "
            f"a {encoder.rel_pos_bias} relative position bias, defined over the full patch grid: "
            "set encoder.rel_pos_bias: none or recipe.encoder_mode: mask_token"
        )
    return encoder


def dump_encoder(out: dict[str, Any], encoder: EncoderConfig, recipe: RecipeConfig | None) -> None:
    """With ``recipe.encoder_defaults``, write every variant field of the dumped ``encoder``
    (even at the plain value), so that reloading the dump keeps what the user chose over the
    recipe's defaults."""
    if recipe is not None and recipe.encoder_defaults is not None:
        out["encoder"].update({k: getattr(encoder, k) for k in VARIANT_FIELDS})


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
        # assigned without re-validation (validate_assignment would run this validator again)
        object.__setattr__(self, "encoder", resolve_encoder(self.encoder, self.recipe))
        check_masking_fits(self.recipe.masking, self.encoder, "recipe.masking")
        check_encoder_fits(self.recipe, self.encoder, "recipe")
        if self.data.fast_decode and self.recipe.global_crops > 1:
            raise ConfigError(
                f"data.fast_decode decodes each image once at reduced size for one crop, but "
                f"recipe.global_crops is {self.recipe.global_crops}: set data.fast_decode: false"
            )
        if self.data.fast_decode and self.recipe.augment != "none":
            raise ConfigError(
                f"data.fast_decode crops to uint8 tensors without the photometric ops of "
                f"recipe.augment '{self.recipe.augment}': set data.fast_decode: false or "
                "recipe.augment: none"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        dump_encoder(out, self.encoder, self.recipe)
        return out
