"""The transfer suite: one encoder probed (or fine-tuned) on several ImageFolder datasets.

Each dataset of ``datasets`` (``{name, root}`` for a set the user has, e.g. the fine-grained and
VTAB-style sets of Kornblith et al., "Do Better ImageNet Models Transfer Better?", CVPR 2019, and
Zhai et al., "A Large-scale Study of Representation Learning with the Visual Task Adaptation
Benchmark", 2019; or ``{name, synthetic: {...}}`` for a set drawn by
:mod:`harness.core.data.shapes_transfer`) is evaluated by every protocol of ``protocols``: each is
the config of a classification task (``linear_probe``, ``attentive_probe``, ``knn``,
``finetune``) and runs through that task's own ``run`` on the dataset, so there is no second
copy of any loop and each protocol keeps its rule (heads chosen on a held-out part of train,
read on val).

Metrics: ``top1_<protocol>_<dataset>`` for every (dataset, protocol) and
``top1_<protocol>_mean``, the mean over datasets. The leaderboard adds
``rank_<protocol>_mean``: each encoder's rank among the leaderboard's rows on every dataset
(1 = best, ties share the average rank), averaged over datasets (the record's ``ranked`` detail
names the columns; :func:`harness.leaderboard.mean_rank`), as VTAB and transfer studies report
mean rank next to mean accuracy. The details keep each (dataset, protocol)'s whole result.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from harness.core.config import DataConfig, StrictModel, TaskConfig, parse_task_config
from harness.core.data.datasets import check_classification_data
from harness.core.data.shapes_transfer import TransferSetSpec, ensure_transfer_set

from .base import BenchBatch, Task, TaskContext, TaskResult, get_task, register_task

#: Tasks a transfer protocol may name: one ``top1`` on an ImageFolder's val split.
PROTOCOL_TASKS = ("linear_probe", "attentive_probe", "knn", "finetune")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class TransferDataset(StrictModel):
    """One dataset of the suite.

    Attributes:
        name: Short name (letters, digits, '-'), part of the metric names.
        root: An ImageFolder root holding ``train/<class>/`` and ``val/<class>/``.
        synthetic: Instead of ``root``: a synthetic set
            (:class:`harness.core.data.shapes_transfer.TransferSetSpec` keys).
    """

    name: str
    root: str | None = None
    synthetic: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v == "mean":
            raise ValueError(f"dataset name '{v}' must be letters, digits and '-' (not 'mean'): "
                             "it names the metrics")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TransferDataset:
        if (self.root is None) == (self.synthetic is None):
            raise ValueError(f"transfer dataset '{self.name}' needs exactly one of root (an "
                             "ImageFolder path) or synthetic (a shapes_transfer spec)")
        if self.synthetic is not None:
            TransferSetSpec.from_dict(self.synthetic)
        return self

    def data(self, base: DataConfig, cache_root: str | None = None) -> DataConfig:
        """``base`` reading this dataset (a synthetic one is generated into the cache first)."""
        if self.synthetic is not None:
            root = ensure_transfer_set(TransferSetSpec.from_dict(self.synthetic), cache_root)
        else:
            root = Path(str(self.root)).expanduser()
        return base.model_copy(update={"source": str(root)})


class TransferConfig(TaskConfig):
    """Transfer suite (see :mod:`downstream.transfer`).

    Attributes:
        datasets: The datasets; empty: the suite's own data alone, named ``data``.
        protocols: Task configs (``{name: linear_probe, epochs: 20}``, ...) of
            :data:`PROTOCOL_TASKS`, each run on every dataset.
        synthetic_cache: Where synthetic sets are generated (default ``$MIMBENCH_CACHE/data``).
    """

    name: Literal["transfer"] = "transfer"
    datasets: list[TransferDataset] = Field(default_factory=list)
    protocols: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "linear_probe"}], min_length=1
    )
    synthetic_cache: str | None = None

    HASH_OMIT_DEFAULTS: ClassVar[tuple[str, ...]] = ("synthetic_cache",)

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = [p.get("name") for p in v]
        bad = [n for n in names if n not in PROTOCOL_TASKS]
        if bad:
            raise ValueError(f"transfer protocols {bad} are not among {list(PROTOCOL_TASKS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"transfer protocols name a task twice: {names}")
        for p in v:
            parse_task_config(p)  # its own schema's errors, now
        return v

    @field_validator("datasets")
    @classmethod
    def _distinct(cls, v: list[TransferDataset]) -> list[TransferDataset]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"transfer dataset names must be distinct, got {names}")
        return v

    def protocol_configs(self) -> list[TaskConfig]:
        """The protocols' validated task configs."""
        return [parse_task_config(p) for p in self.protocols]

    def dataset_names(self) -> list[str]:
        """The datasets' names (``data`` for the suite's own data)."""
        return [d.name for d in self.datasets] or ["data"]


def metric_name(protocol: str, dataset: str) -> str:
    """``top1_<protocol>_<dataset>`` (``dataset`` = ``mean``: the mean over datasets)."""
    return f"top1_{protocol}_{dataset}"


@register_task("transfer")
class Transfer(Task):
    """Every protocol on every dataset, aggregated (see the module docstring)."""

    name = "transfer"
    version = 1
    metrics = {metric_name("linear_probe", d): True for d in ("data", "mean")}
    config_cls = TransferConfig

    def metric_names(self, cfg: TaskConfig) -> dict[str, bool]:
        """One ``top1_<protocol>_<dataset>`` per pair, and each protocol's mean."""
        assert isinstance(cfg, TransferConfig)
        return {metric_name(str(p["name"]), d): True for p in cfg.protocols
                for d in [*cfg.dataset_names(), "mean"]}  # fmt: skip

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """Every dataset given by a root (or the suite's data) in ImageFolder layout, as each
        protocol checks it (synthetic sets are generated in their layout)."""
        assert isinstance(cfg, TransferConfig)
        targets = [d.data(data) for d in cfg.datasets if d.root is not None]
        for target in targets if cfg.datasets else [data]:
            check_classification_data(target)
            for p in cfg.protocol_configs():
                get_task(p.name).check_data(p, target)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """The first protocol's step (a frozen forward pass for the probes)."""
        return get_task(self.config_cls().protocol_configs()[0].name).bench_step(encoder, batch)

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, TransferConfig)
        t0 = time.time()
        sets = [(d.name, d.data(ctx.data, cfg.synthetic_cache)) for d in cfg.datasets]
        metrics: dict[str, float] = {}
        results: dict[str, dict[str, Any]] = {}
        for ds_name, data in sets or [("data", ctx.data)]:
            for pcfg in cfg.protocol_configs():
                t1 = time.time()
                sub = TaskContext(data=data, seed=ctx.seed, device=ctx.device,
                                  out_dir=ctx.out_dir / ds_name / pcfg.name,
                                  log=_prefixed(ctx.log, f"[transfer {ds_name}] "))  # fmt: skip
                res = get_task(pcfg.name).run(encoder, pcfg, sub)
                metrics[metric_name(pcfg.name, ds_name)] = res.metrics["top1"]
                results.setdefault(ds_name, {})[pcfg.name] = {
                    "metrics": res.metrics, "seconds": time.time() - t1,
                    "source": data.source, "details": res.details,
                }  # fmt: skip
                ctx.log(f"[transfer] {ds_name} / {pcfg.name}: top1 {res.metrics['top1']:.2f} "
                        f"({time.time() - t1:.1f}s)")
        names = list(results)
        for pcfg in cfg.protocol_configs():
            vals = [metrics[metric_name(pcfg.name, d)] for d in names]
            metrics[metric_name(pcfg.name, "mean")] = sum(vals) / len(vals)
        return TaskResult(
            metrics=metrics,
            details={
                "datasets": results,
                "ranked": {f"rank_{p['name']}_mean": [metric_name(p["name"], d) for d in names]
                           for p in cfg.protocols},  # fmt: skip
                "total_seconds": time.time() - t0,
            },
        )


def _prefixed(log: Any, prefix: str) -> Callable[[str], None]:
    """``log`` with ``prefix`` before each message."""
    return lambda message: log(prefix + message)
