"""Typed configuration: schemas (pydantic v2), YAML loading with one ``extends:`` parent, and
``--set a.b=c`` overrides.

Every schema rejects unknown keys with a did-you-mean. Defaults live in the schemas and, for a
recipe, in its recipe file (:mod:`harness.core.config.recipe_files`), merged under what the user
wrote, so the resolved config that ``mimbench validate`` prints, and that every run stores, holds
every value that was used. Axis names are checked against the registries that :mod:`pretrain`
fills (:mod:`harness.core.config.axes`).

The modules, by job: :mod:`~harness.core.config.base` (the strict base schema),
:mod:`~harness.core.config.data`, :mod:`~harness.core.config.encoder` (with the presets),
:mod:`~harness.core.config.masking` (with the masking plan), :mod:`~harness.core.config.recipe`
(heads, targets, tokenizers, losses), :mod:`~harness.core.config.recipe_files`,
:mod:`~harness.core.config.train`, :mod:`~harness.core.config.tasks`,
:mod:`~harness.core.config.suite` and :mod:`~harness.core.config.loading`.
"""

from harness.core.config.axes import (
    ENCODER_INITS,
    HEADS,
    LOSSES,
    MASKERS,
    RECIPES,
    TARGETS,
    TOKENIZERS,
    EncoderInitRule,
    check_name,
)
from harness.core.config.base import ConfigError, StrictModel, deep_merge
from harness.core.config.data import DataConfig, ShapesConfig
from harness.core.config.encoder import ENCODER_PRESETS, EncoderConfig
from harness.core.config.loading import (
    CONFIG_KINDS,
    apply_overrides,
    dump_config,
    format_validation_error,
    hashed_dump,
    load_config,
    load_yaml_with_extends,
    to_plain,
    validate_config,
)
from harness.core.config.masking import (
    MaskingConfig,
    MaskPlan,
    MultiBlockConfig,
    check_masking_fits,
    plan_masking,
)
from harness.core.config.recipe import (
    ClusteringConfig,
    HeadConfig,
    HOGConfig,
    IBOTConfig,
    LatentConfig,
    LossConfig,
    PairsConfig,
    RecipeConfig,
    TargetConfig,
    TeacherConfig,
    TokenizerConfig,
)
from harness.core.config.recipe_files import RECIPE_FILE_KEYS, recipe_file, recipe_names
from harness.core.config.suite import (
    CHECKPOINT_FORMATS,
    TIMM_PREFIX,
    EncoderEntry,
    SuiteConfig,
    checkpoint_format_names,
)
from harness.core.config.tasks import (
    TASK_CONFIGS,
    TaskConfig,
    parse_task_config,
    task_config_classes,
)
from harness.core.config.train import PretrainConfig, PretrainSpec, TrainConfig

__all__ = [
    "CHECKPOINT_FORMATS",
    "CONFIG_KINDS",
    "ENCODER_INITS",
    "ENCODER_PRESETS",
    "EncoderInitRule",
    "HEADS",
    "LOSSES",
    "MASKERS",
    "RECIPES",
    "RECIPE_FILE_KEYS",
    "TARGETS",
    "TASK_CONFIGS",
    "TIMM_PREFIX",
    "TOKENIZERS",
    "ConfigError",
    "DataConfig",
    "EncoderConfig",
    "EncoderEntry",
    "ClusteringConfig",
    "HOGConfig",
    "IBOTConfig",
    "HeadConfig",
    "LatentConfig",
    "LossConfig",
    "MaskPlan",
    "MaskingConfig",
    "MultiBlockConfig",
    "PairsConfig",
    "PretrainConfig",
    "PretrainSpec",
    "RecipeConfig",
    "ShapesConfig",
    "StrictModel",
    "SuiteConfig",
    "TargetConfig",
    "TaskConfig",
    "TeacherConfig",
    "TokenizerConfig",
    "TrainConfig",
    "apply_overrides",
    "check_masking_fits",
    "check_name",
    "checkpoint_format_names",
    "deep_merge",
    "dump_config",
    "format_validation_error",
    "hashed_dump",
    "load_config",
    "load_yaml_with_extends",
    "parse_task_config",
    "plan_masking",
    "recipe_file",
    "recipe_names",
    "task_config_classes",
    "to_plain",
    "validate_config",
]
