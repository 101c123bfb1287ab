"""Partial fine-tuning: fine-tune the last k blocks, the rest frozen (He et al., "Masked
Autoencoders Are Scalable Vision Learners", CVPR 2022, Sec. 4.3 and Fig. 9).

For every k of ``blocks`` the encoder is fine-tuned with :mod:`downstream.finetune`'s recipe and
loop (:func:`downstream.finetune._setup` with ``trainable_blocks=k``): the last k blocks, the
final norm, the pooling norm and the classifier train; the embeddings and the other blocks stay
as loaded. ``k = 0`` trains the head alone (MAE's k = 0 is its linear probe, whose head is a
BatchNorm + linear; here it is fine-tuning's fc_norm + linear with fine-tuning's recipe, so the
curve is one protocol); ``all`` is full fine-tuning, embeddings included. MAE tunes the number
of epochs per k (fewer tuned blocks want a longer schedule); here every k uses ``epochs``.

Each k is one metric, ``top1_k<k>`` (``top1_all``), so the leaderboard shows the curve as
columns, and the record's ``curve`` detail holds (k, top-1) pairs, which the HTML and markdown
reports plot (blocks fine-tuned vs top-1, one line per encoder). ``metric_seconds`` holds each
k's wall seconds (its fine-tuning and evaluation), which ``mimbench report --with-time`` shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from harness.core.config import DataConfig, TaskConfig
from harness.core.data.datasets import check_classification_data

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .finetune import (
    FinetuneConfig,
    FinetuneModel,
    _finish,
    _restore,
    _setup,
    _train,
    param_groups_layer_decay,
    trains,
)

BlockCount = int | Literal["all"]


class PartialFinetuneConfig(FinetuneConfig):  # type: ignore[misc]
    """Partial fine-tuning (see :mod:`downstream.partial_finetune`): every key of
    :class:`downstream.finetune.FinetuneConfig`, plus

    Attributes:
        blocks: The k values, last blocks fine-tuned (``all``: every weight). Clipped to the
            encoder's depth; each gives one metric ``top1_k<k>``.
    """

    name: Literal["partial_finetune"] = "partial_finetune"  # type: ignore[assignment]
    blocks: list[BlockCount] = Field(default_factory=lambda: [0, 1, 2, 4, "all"], min_length=1)

    @field_validator("blocks")
    @classmethod
    def _distinct_non_negative(cls, v: list[BlockCount]) -> list[BlockCount]:
        if any(isinstance(k, int) and k < 0 for k in v) or len(set(map(str, v))) != len(v):
            raise ValueError(f"blocks must be distinct k >= 0 or 'all', got {v}")
        return v


def metric_name(k: BlockCount) -> str:
    """``top1_k<k>``, or ``top1_all``."""
    return "top1_all" if k == "all" else f"top1_k{k}"


@register_task("partial_finetune")
class PartialFinetune(Task):
    """MAE's partial fine-tuning curve (see the module docstring)."""

    name = "partial_finetune"
    version = 1
    metrics = {metric_name(k): True for k in PartialFinetuneConfig().blocks}
    config_cls = PartialFinetuneConfig
    data_parallel = True

    def metric_names(self, cfg: TaskConfig) -> dict[str, bool]:
        """One ``top1_k<k>`` per k of the config."""
        assert isinstance(cfg, PartialFinetuneConfig)
        return {metric_name(k): True for k in cfg.blocks}

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """One fine-tuning step with the last 2 blocks trained (AdamW, layer decay 0.65)."""
        for name, p in encoder.named_parameters():
            p.requires_grad_(trains(encoder, name, 2))
        model = FinetuneModel(encoder, batch.num_classes).to(batch.images.device).train()
        groups = param_groups_layer_decay(model, 0.05, 0.65)
        adamw = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=1e-4)  # fmt: skip

        def step() -> None:
            with batch.autocast():
                loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
            adamw.zero_grad(set_to_none=True)
            loss.backward()
            adamw.step()

        return step

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, PartialFinetuneConfig)
        t0 = time.time()
        depth = int(encoder.num_layers)
        curve: list[dict[str, Any]] = []
        metrics: dict[str, float] = {}
        for k in cfg.blocks:
            trainable = None if k == "all" else min(int(k), depth)
            tag = "all" if k == "all" else str(k)
            run = _setup(encoder, cfg, ctx, trainable_blocks=trainable,
                         ckpt_name=f"partial_k{tag}_checkpoint.pth")  # fmt: skip
            n_train = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            ctx.log(f"[partial_finetune] k={tag}: {n_train} trainable parameters")
            _restore(run)
            t1 = time.time()
            _train(run)
            res = _finish(run, time.time() - t1, t1)
            metrics[metric_name(k)] = res.metrics["top1"]
            curve.append({"k": tag, "blocks": depth if k == "all" else trainable,
                          "top1": res.metrics["top1"], "top5": res.metrics["top5"],
                          "trainable_params": n_train, "seconds": time.time() - t1})  # fmt: skip
        ctx.log("[partial_finetune] " + ", ".join(f"k={c['k']}: {c['top1']:.2f}" for c in curve))
        return TaskResult(
            metrics=metrics,
            details={
                "curve": {"x": "blocks fine-tuned", "y": "top-1 (%)",
                          "points": [[c["blocks"], c["top1"]] for c in curve]},  # fmt: skip
                "per_k": curve,
                "metric_seconds": {metric_name(k): c["seconds"]
                                   for k, c in zip(cfg.blocks, curve, strict=True)},
                "depth": depth,
                "total_seconds": time.time() - t0,
            },
        )
