"""The stage planner: a suite, or every row of a sweep, expanded once into its stages.

For every seed and encoder entry of a suite (in that order) the plan holds a pretraining stage,
when the entry pretrains here, and one task stage per task of the suite, which depends on that
pretraining. Each stage's key is computed here and nowhere else:

* a pretraining stage is keyed by its directory name ``<encoder>-s<seed>-<hash10>``: the hash of
  its resolved pretraining config without ``name`` and ``output_dir``, so suites and sweep rows
  that pretrain the same config share one directory (and one training);
* a task stage is keyed by the hash of its run config (:func:`run_config_for` plus the task's
  version), the ``config_hash`` its record stores: a finished run is found again by it.

Everything a suite writes lives under ``output_dir/name`` (:func:`suite_dir`): ``pretrain/<key>``,
``tasks/<encoder>-<task>-s<seed>-<hash10>`` (:func:`task_stage_dir`, read back by
:func:`task_dir_key`) and ``records/``. ``mimbench plan`` shows the stages with their states
(:mod:`harness.plan`), the in-process runner executes them (:mod:`harness.runner`), the launchers
submit them (:mod:`harness.launch`), and ``mimbench status`` reads the directories they write
(:mod:`harness.status`).

:func:`check_plans` rejects bad input before any stage runs: a missing checkpoint, a pretraining
dataset that is not an ImageFolder, and each task's own :meth:`downstream.base.Task.check_data`,
so that a missing dataset fails in seconds, not after pretraining.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from downstream.base import Task, get_task
from harness.core.config import (
    TIMM_PREFIX,
    ConfigError,
    EncoderEntry,
    PretrainConfig,
    SuiteConfig,
    TaskConfig,
    hashed_dump,
    to_plain,
)
from harness.core.data.datasets import resolve_imagefolder_root
from harness.core.errors import CheckpointError
from harness.core.fsutil import config_hash, pretrain_config_hash
from harness.core.records import SweepInfo
from harness.sweep import SweepRow, row_encoder_name, variant_name
from pretrain.engine import ENCODER, SUMMARY

#: Sub-directories of a suite directory: pretraining stages, task stages.
PRETRAIN_DIR = "pretrain"
TASKS_DIR = "tasks"
#: Characters of a config hash in stage directory names.
KEY_CHARS = 10
#: In a pretraining stage directory whose last attempt failed (removed once it succeeds).
PRETRAIN_FAILED = "failed.json"


# --------------------------------------------------------------------------- keys and directories


def suite_dir(cfg: SuiteConfig) -> Path:
    """Where a suite writes: ``output_dir/name``."""
    return Path(cfg.output_dir) / cfg.name


def pretrain_config_for(entry: EncoderEntry, suite: SuiteConfig, seed: int) -> PretrainConfig:
    """The standalone pretraining config an encoder entry of a suite stands for."""
    assert entry.pretrain is not None
    return PretrainConfig(
        name=entry.name,
        seed=seed,
        data=suite.data,
        encoder=entry.encoder,
        recipe=entry.pretrain.recipe,
        train=entry.pretrain.train,
    )


def pretrain_stage_dir(root: Path, pcfg: PretrainConfig) -> Path:
    """``root/pretrain/<name>-s<seed>-<hash>``; the hash covers everything but the name."""
    h = pretrain_config_hash(to_plain(pcfg))
    return root / PRETRAIN_DIR / f"{pcfg.name}-s{pcfg.seed}-{h[:KEY_CHARS]}"


def run_config_for(entry: EncoderEntry, task: TaskConfig, suite: SuiteConfig, seed: int) -> dict[str, Any]:
    """The resolved config stored in a run's record (and hashed, with the task's version, into
    the run's key: :func:`task_run_config`).

    Fields added to the schemas later are left out while at their default
    (:func:`harness.core.config.hashed_dump`), so that existing records keep matching their runs.
    """
    return {
        "suite": suite.name,
        "encoder": hashed_dump(entry),
        "task": hashed_dump(task),
        "data": suite.data.model_dump(mode="json"),
        "seed": seed,
    }


def task_run_config(entry: EncoderEntry, tcfg: TaskConfig, task: Task, suite: SuiteConfig,
                    seed: int) -> tuple[dict[str, Any], str]:
    """A task run's record config (:func:`run_config_for` with ``task_version``) and its key."""
    rc = run_config_for(entry, tcfg, suite, seed)
    rc["task_version"] = task.version
    return rc, config_hash(rc)


def task_stage_dir(root: Path, encoder: str, task: str, seed: int, h: str) -> Path:
    """``root/tasks/<encoder>-<task>-s<seed>-<hash10>``: a task run's directory (log, outputs)."""
    return root / TASKS_DIR / f"{encoder}-{task}-s{seed}-{h[:KEY_CHARS]}"


def task_dir_key(dirname: str) -> tuple[str, str | None]:
    """The key prefix (``hash10``) and, where the name can be split, the task of a task stage
    directory name (:func:`task_stage_dir`); encoder names may hold ``-``, task names do not."""
    parts = dirname.rsplit("-", 3)
    return parts[-1], (parts[-3] if len(parts) == 4 else None)


# --------------------------------------------------------------------------- stages on disk


def pretrain_done(stage: Path) -> bool:
    """Whether a pretraining stage directory holds its finished outputs."""
    return (stage / SUMMARY).is_file() and (stage / ENCODER).is_file()


def read_pretrain_failure(stage: Path) -> str | None:
    """``Type: message`` of a pretraining stage's last failure, or None if it did not fail (or
    finished since)."""
    path = stage / PRETRAIN_FAILED
    if not path.is_file() or pretrain_done(stage):
        return None
    try:
        err = json.loads(path.read_text())
        return f"{err['type']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return "unknown error (unreadable failed.json)"


# --------------------------------------------------------------------------- the stage graph


@dataclass(frozen=True)
class StageFilter:
    """Part of a suite (what one launcher job runs).

    Attributes:
        encoder: Only this encoder entry (None: all).
        seed: Only this seed (None: all).
        task: Only this task (None: all).
        pretrain_only: Obtain (pretrain) the encoders but run no task.
        no_pretrain: Pretrain nothing: a task whose encoder's pretraining has not finished is
            recorded as failed ("blocked: pretraining ... failed") without running (a launcher
            job whose dependency failed).
        key: Only the task run of this key (one of several runs of the same task, e.g. the
            robustness runs of different classifiers; None: all).
        data_parallel: Only the tasks that run on every rank of a process group
            (:attr:`downstream.base.Task.data_parallel`: True), only the others (False), or
            both (None).
    """

    encoder: str | None = None
    seed: int | None = None
    task: str | None = None
    pretrain_only: bool = False
    no_pretrain: bool = False
    key: str | None = None
    data_parallel: bool | None = None


@dataclass(frozen=True, eq=False)
class PretrainStage:
    """One encoder entry pretrained at one seed.

    Attributes:
        entry: The suite's encoder entry.
        seed: The seed.
        config: The standalone pretraining config it runs (:func:`pretrain_config_for`).
        dir: Its stage directory (:func:`pretrain_stage_dir`).
    """

    entry: EncoderEntry
    seed: int
    config: PretrainConfig
    dir: Path

    @property
    def key(self) -> str:
        """The stage's key: its directory name."""
        return self.dir.name


@dataclass(frozen=True, eq=False)
class TaskStage:
    """One task run: an encoder entry on one task at one seed.

    Attributes:
        entry: The suite's encoder entry.
        seed: The seed.
        task_cfg: The suite's task entry.
        task: The registered task it runs.
        run_config: The config its record stores (with ``task_version``).
        key: The hash of ``run_config`` (the record's ``config_hash``).
        dir: Its stage directory (:func:`task_stage_dir`).
        after: The pretraining it depends on (None: its encoder is loaded or random).
        inputs: The earlier task runs whose outputs it reads (:meth:`Task.inputs`).
    """

    entry: EncoderEntry
    seed: int
    task_cfg: TaskConfig
    task: Task
    run_config: dict[str, Any]
    key: str
    dir: Path
    after: PretrainStage | None
    inputs: tuple[TaskStage, ...] = ()

    @property
    def kind(self) -> str:
        """The task's name."""
        return self.task_cfg.name


@dataclass(frozen=True, eq=False)
class EncoderStages:
    """The stages of one encoder entry at one seed: its pretraining, if any, then its task runs
    (which evaluate the same encoder, so a runner obtains it once for all of them)."""

    entry: EncoderEntry
    seed: int
    pretrain: PretrainStage | None
    tasks: tuple[TaskStage, ...]


@dataclass(frozen=True, eq=False)
class SuitePlan:
    """The stages of one suite (or one sweep row), in execution order.

    Attributes:
        suite: The suite.
        root: Its directory (:func:`suite_dir`).
        sweep: The sweep row the suite is (None outside sweeps).
        groups: Per seed, then per encoder entry, that encoder's stages.
    """

    suite: SuiteConfig
    root: Path
    sweep: SweepInfo | None
    groups: tuple[EncoderStages, ...]

    @property
    def label(self) -> str:
        """The sweep row's name (e.g. ``depth=8``); empty outside sweeps."""
        return variant_name(self.sweep.tags) if self.sweep else ""

    def encoder_name(self, entry: EncoderEntry) -> str:
        """The entry's name in records: ``<encoder>@<row>`` in a sweep row."""
        return row_encoder_name(entry.name, self.sweep)

    def stages(self) -> Iterator[PretrainStage | TaskStage]:
        """Every stage, each pretraining before the task runs that depend on it."""
        for group in self.groups:
            if group.pretrain is not None:
                yield group.pretrain
            yield from group.tasks

    def select(self, only: StageFilter) -> list[EncoderStages]:
        """The groups ``only`` selects, each with only its selected task runs (none with
        ``only.pretrain_only``)."""
        out = []
        for g in self.groups:
            if only.encoder not in (None, g.entry.name) or only.seed not in (None, g.seed):
                continue
            tasks = () if only.pretrain_only else tuple(
                t for t in g.tasks if only.task in (None, t.kind) and only.key in (None, t.key)
                and only.data_parallel in (None, t.task.data_parallel))
            out.append(EncoderStages(g.entry, g.seed, g.pretrain, tasks))
        return out


def plan_stages(cfg: SuiteConfig, sweep: SweepInfo | None = None) -> SuitePlan:
    """Expand a suite into its stages (unknown task names fail here, before anything runs).

    Args:
        cfg: The suite.
        sweep: The sweep row the suite is.
    """
    root = suite_dir(cfg)
    tasks = [(t, get_task(t.name)) for t in cfg.tasks]
    groups = []
    for seed in cfg.seeds:
        for entry in cfg.encoders:
            pre = None
            if entry.pretrain is not None:
                pcfg = pretrain_config_for(entry, cfg, seed)
                pre = PretrainStage(entry, seed, pcfg, pretrain_stage_dir(root, pcfg))
            runs: list[TaskStage] = []
            for tcfg, task in tasks:
                inputs = _task_inputs(tcfg, task, runs)
                rc, h = task_run_config(entry, tcfg, task, cfg, seed)
                if inputs:  # keyed by what it reads: a re-run input is a new run
                    rc["inputs"] = {s.kind: s.key for s in inputs}
                    h = config_hash(rc)
                runs.append(TaskStage(entry, seed, tcfg, task, rc, h,
                                      task_stage_dir(root, entry.name, tcfg.name, seed, h), pre,
                                      inputs))
            groups.append(EncoderStages(entry, seed, pre, tuple(runs)))
    return SuitePlan(cfg, root, sweep, tuple(groups))


def _task_inputs(tcfg: TaskConfig, task: Task, earlier: list[TaskStage]) -> tuple[TaskStage, ...]:
    """The earlier task runs of the same encoder and seed that ``task`` reads.

    Raises:
        ConfigError: An input task is not listed before it, or is listed more than once.
    """
    out = []
    for name in task.inputs(tcfg):
        found = [s for s in earlier if s.kind == name]
        if len(found) != 1:
            why = "is not listed before it" if not found else f"is listed {len(found)} times"
            raise ConfigError(
                f"task '{tcfg.name}' reads the output of task '{name}', which {why} in the "
                f"suite's tasks: list '{name}' exactly once, before '{tcfg.name}'"
            )
        out.append(found[0])
    return tuple(out)


def plan_sweep_stages(rows: list[SweepRow]) -> list[SuitePlan]:
    """The plan of every row of a sweep (all rows share one suite directory)."""
    return [plan_stages(r.config, r.info) for r in rows]


# --------------------------------------------------------------------------- checks before running


def check_plans(plans: Iterable[SuitePlan], only: StageFilter | None = None) -> None:
    """Reject bad input before any stage runs.

    Checks every encoder's checkpoint file, the pretraining dataset where a selected stage
    pretrains, and the data of each selected task run
    (:meth:`~downstream.base.Task.check_data`; each distinct task config and dataset once).

    Args:
        plans: The suite, or every row of a sweep.
        only: The part that will run (None: all of it); a launcher job checks its own stage.

    Raises:
        UserError: Naming what is missing or wrong (a checkpoint, a dataset path, its layout).
    """
    only = only or StageFilter()
    checked: set[str] = set()
    for plan in plans:
        cfg = plan.suite
        _check_checkpoints(cfg)
        groups = plan.select(only)
        data = cfg.data.model_dump(mode="json")
        pretrains = not only.no_pretrain and any(g.pretrain is not None for g in groups)
        what = json.dumps(["pretrain", data], sort_keys=True)
        if pretrains and cfg.data.source != "shapes" and what not in checked:
            resolve_imagefolder_root(cfg.data)  # pretraining reads an ImageFolder
            checked.add(what)
        for run in (t for g in groups for t in g.tasks):
            what = json.dumps([run.kind, run.run_config["task"], data], sort_keys=True)
            if what not in checked:
                run.task.check_data(run.task_cfg, cfg.data)
                checked.add(what)


def _check_checkpoints(cfg: SuiteConfig) -> None:
    """Every encoder checkpoint file a suite names exists (``timm:`` names are not files)."""
    for entry in cfg.encoders:
        if entry.checkpoint is None or entry.checkpoint.startswith(TIMM_PREFIX):
            continue
        if not Path(entry.checkpoint).is_file():
            raise CheckpointError(
                f"encoder '{entry.name}': checkpoint {entry.checkpoint} does not exist; fix the path"
            )
