"""The task interface (in the spirit of lm-evaluation-harness): a name, a version, metric names
with their direction, and ``run(encoder, config, context) -> TaskResult``.

Bump ``version`` whenever a protocol changes so that old records are never silently compared
with new ones (the leaderboard keeps the newest version of each task).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from harness.core.config import TASK_CONFIGS, DataConfig, TaskConfig
from harness.core.registry import Registry
from pretrain.encoders.base import Encoder


@dataclass
class TaskContext:
    """What a task needs besides the encoder and its own config."""

    data: DataConfig
    seed: int
    device: torch.device
    out_dir: Path
    log: Any = print


@dataclass
class TaskResult:
    """Metrics (finite floats, named as in ``Task.metrics``) and free-form details."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A downstream protocol."""

    name: ClassVar[str]
    version: ClassVar[int]
    metrics: ClassVar[dict[str, bool]]  # metric name -> higher_is_better
    config_cls: ClassVar[type[TaskConfig]]

    @abstractmethod
    def run(self, encoder: Encoder, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        """Evaluate ``encoder``; must not modify its weights."""


TASKS: Registry[type[Task]] = Registry("task")

#: Short names ``mimbench eval`` accepts besides the registered task names (alias -> task).
TASK_ALIASES: dict[str, str] = {
    "linear": "linear_probe",
    "linear-faithful": "linear_probe_faithful",
    "linear_faithful": "linear_probe_faithful",
    "ft": "finetune",
}


def resolve_task_name(name: str) -> str:
    """The registered task name of ``name`` or of its alias (unknown names pass through, so that
    validation reports them with a did-you-mean)."""
    return TASK_ALIASES.get(name, name)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a task under ``name`` together with its config schema."""

    def add(cls: type[Task]) -> type[Task]:
        TASKS.register(name, cls)
        TASK_CONFIGS.register(name, cls.config_cls)
        return cls

    return add


def all_tasks() -> dict[str, type[Task]]:
    """Every registered task class by name."""
    return {name: TASKS.get(name) for name in TASKS.names()}


def get_task(name: str) -> Task:
    """Instantiate the task registered under ``name`` (importing the task modules first)."""
    return TASKS.get(name)()
