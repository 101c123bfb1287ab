"""The task interface (in the spirit of lm-evaluation-harness): a name, a version, metric names
with their direction, ``check_data(config, data)`` (called for every task of a suite before any
stage runs), ``run(encoder, config, context) -> TaskResult``, and the step ``mimbench bench``
times (``bench_step``, or ``bench_pipeline`` for a task trained by another framework's loop).

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

from harness.core.config import TASK_CONFIGS, DataConfig, EncoderConfig, TaskConfig
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
    #: Stage directories of the earlier tasks this one reads (:meth:`Task.inputs`), by task name.
    inputs: dict[str, Path] = field(default_factory=dict)


@dataclass
class BenchBatch:
    """The fixed batch a task's bench step works on (:meth:`Task.bench_step`).

    Attributes:
        images: ``[B, 3, H, W]`` on the device, H = W = the encoder's image size.
        labels: ``[B]`` class ids in ``[0, num_classes)``.
        num_classes: Classes of the head a step trains.
        amp: Whether steps run under bfloat16 autocast (on CUDA).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    amp: bool

    def autocast(self) -> Any:
        """The autocast context of a step (a no-op without ``amp``)."""
        return torch.autocast(self.images.device.type, dtype=torch.bfloat16, enabled=self.amp)


@dataclass
class PipelineBench:
    """What a task that times its own training iterations reports (:meth:`Task.bench_pipeline`).

    Attributes:
        input: The input size, e.g. ``1024x1024``.
        batch_size: Images per iteration.
        seconds_per_iter: Median seconds per timed iteration.
        peak_mb: Peak memory in MiB (CUDA allocated, or the process's resident set on CPU).
        gflops_per_img: GFLOPs per image of one iteration, or None when not counted.
        details: Every figure measured (per-iteration times, losses, memory, device).
    """

    input: str
    batch_size: int
    seconds_per_iter: float
    peak_mb: float | None
    gflops_per_img: float | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """Metrics (finite floats, named as in ``Task.metrics``) and free-form details."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A downstream protocol.

    ``mimbench bench`` times one step of each task: :meth:`bench_step` on a fixed batch, or,
    for a task whose step runs inside another framework's training loop (mmengine),
    :meth:`bench_pipeline`, which times that loop itself.
    """

    name: ClassVar[str]
    version: ClassVar[int]
    metrics: ClassVar[dict[str, bool]]  # metric name -> higher_is_better
    config_cls: ClassVar[type[TaskConfig]]
    #: Under torchrun (or a multi-process SLURM job) the task runs on every rank of the process
    #: group, data-parallel, and rank 0 writes its record; the other tasks run on rank 0 alone.
    data_parallel: ClassVar[bool] = False

    def metric_names(self, cfg: TaskConfig) -> dict[str, bool]:
        """The metrics (name -> higher_is_better) a run with ``cfg`` reports: :attr:`metrics`,
        unless the config shapes them (partial fine-tuning: one metric per k)."""
        return dict(self.metrics)

    def inputs(self, cfg: TaskConfig) -> tuple[str, ...]:
        """Earlier tasks of the same encoder and seed whose stage outputs this task reads (the
        robustness suite: the task whose saved classifier it evaluates). The planner requires
        each to be listed once, before this task, in the suite, hands their stage directories
        over in :attr:`TaskContext.inputs` and keys this task's run by theirs."""
        return ()

    @abstractmethod
    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """Check the dataset this task would read, cheaply (no image decoded, nothing trained):
        the planner calls it for every task of a suite before any stage runs.

        Raises:
            UserError: Naming what is missing or wrong (a path, a split, a class list).
        """

    @abstractmethod
    def run(self, encoder: Encoder, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        """Evaluate ``encoder``; must not modify its weights."""

    def bench_step(self, encoder: Encoder, batch: BenchBatch) -> Callable[[], None]:
        """One step of this task on ``batch``, as ``mimbench bench`` times it (each call does
        the step's forward, backward and optimizer update, or only the frozen forward of a task
        whose cost per image is its feature extraction).

        Raises:
            NotImplementedError: The task times its own iterations (:meth:`bench_pipeline`).
        """
        raise NotImplementedError(f"task '{self.name}' has no bench step")

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """Images one run of this task passes through its :meth:`bench_step`, for the cost
        estimate before a run (``mimbench plan --estimate``, :mod:`harness.estimate`): steps x
        batch of an optimization loop, or the images a cached-feature task extracts features of.

        Args:
            cfg: The task config.
            encoder: The encoder config it evaluates.
            n_train: Images of the train split.
            n_val: Images of the val split.

        Returns:
            The count, or None where the task has no rule (the estimate then says the stage is
            not estimated, never that it is free).
        """
        return None

    def bench_pipeline(self, arch: str, iters: int, count_flops: bool, batch_size: int | None = None,
                       size: int | None = None, threads: int | None = None) -> PipelineBench | None:
        """Time ``iters`` training iterations of this task's own pipeline (the first one a
        warm-up) with a random encoder of preset ``arch``, counting the FLOPs of one more if
        ``count_flops``, at ``batch_size`` images of side ``size`` (None: the task's defaults);
        None for a task timed by :meth:`bench_step`."""
        return None


TASKS: Registry[type[Task]] = Registry("task")

#: Short names ``mimbench eval`` accepts besides the registered task names (alias -> task).
TASK_ALIASES: dict[str, str] = {
    "linear": "linear_probe",
    "linear-faithful": "linear_probe_faithful",
    "linear_faithful": "linear_probe_faithful",
    "ft": "finetune",
    "attentive": "attentive_probe",
    "partial": "partial_finetune",
    "partial-ft": "partial_finetune",
    "low-shot": "low_shot",
    "lowshot": "low_shot",
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
