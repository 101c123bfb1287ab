"""A benchmark suite: encoders (pretrained here, loaded or random) x tasks x seeds."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from harness.core.config.base import StrictModel
from harness.core.config.data import DataConfig
from harness.core.config.encoder import EncoderConfig
from harness.core.config.masking import check_masking_fits
from harness.core.config.recipe import EncoderSetup, check_encoder_fits
from harness.core.config.tasks import TaskConfig, parse_task_config
from harness.core.config.train import PretrainSpec, dump_encoder, resolve_encoder
from harness.core.registry import Registry, did_you_mean

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
            # assigned without re-validation (validate_assignment would rerun this validator)
            object.__setattr__(self, "encoder", resolve_encoder(self.encoder, self.pretrain.recipe))
            masking = self.pretrain.recipe.masking
            check_masking_fits(masking, self.encoder, "pretrain.recipe.masking")
            check_encoder_fits(self.pretrain.recipe, self.encoder, "pretrain.recipe")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        dump_encoder(out, self.encoder, self.pretrain.recipe if self.pretrain else None)
        return out

    @property
    def source(self) -> str:
        if self.pretrain is not None:
            return "pretrain"
        if self.checkpoint is not None:
            return "checkpoint"
        return "random"


class SuiteConfig(StrictModel):
    """A benchmark: encoders x tasks x seeds (``mimbench run FILE``).

    Attributes:
        encoder_setup: ``controlled`` sets ``recipe.encoder_setup: controlled`` on every
            pretrained encoder (one plain encoder definition and ``timm`` init across recipes;
            an entry saying otherwise is refused); ``None`` (left out of dumps): each recipe's.
    """

    kind: Literal["suite"] = "suite"
    name: str = Field("suite", pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "runs"
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    encoders: list[EncoderEntry] = Field(min_length=1)
    tasks: list[SerializeAsAny[TaskConfig]] = Field(min_length=1)
    encoder_setup: EncoderSetup | None = None

    @model_validator(mode="before")
    @classmethod
    def _suite_encoder_setup(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("encoder_setup") is None:
            return data
        setup, entries = data["encoder_setup"], []
        for entry in data.get("encoders") or []:
            recipe = ((entry or {}).get("pretrain") or {}).get("recipe")
            if isinstance(recipe, dict):
                if recipe.get("encoder_setup", setup) != setup:
                    raise ValueError(
                        f"encoder '{entry.get('name')}' sets recipe.encoder_setup "
                        f"'{recipe['encoder_setup']}' but the suite's encoder_setup is '{setup}': "
                        "remove one"
                    )
                recipe = {**recipe, "encoder_setup": setup}
                entry = {**entry, "pretrain": {**entry["pretrain"], "recipe": recipe}}
            entries.append(entry)
        return {**data, "encoders": entries}

    @model_serializer(mode="wrap")
    def _omit_unset_setup(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if self.encoder_setup is None:  # added after suites were hashed
            out.pop("encoder_setup", None)
        return out

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

