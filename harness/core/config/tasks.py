"""Downstream task configs: the base schema and the registry the task modules fill."""

from __future__ import annotations

from typing import Any

from harness.core.config.base import StrictModel
from harness.core.registry import Registry, did_you_mean


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

