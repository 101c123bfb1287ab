"""What detection and segmentation share on the OpenMMLab side (imports mmengine and mmcv).

Registers, into mmengine's root registries (which mmdet's and mmseg's child registries fall
back to):

* ``MimLN2d``: channel LayerNorm for ``[B, C, H, W]`` (ViTDet's norm in necks and heads);
* ``MimLayerDecayOptimWrapperConstructor``: layer-wise lr decay (BEiT, Bao et al. 2022; MAE;
  ViTDet) from our backbone's ``layer_id``;
* ``MimLoadImageFromFile``: mmcv's image loader with a clear error for an unreadable image;
* ``MimIterBasedTrainLoop``: mmengine's iteration loop without its replay of the data loader
  on resume;

and runs a generated config with mmengine's Runner (:func:`run_mm`), allowlisting for
weights-only loading exactly the types mmengine's own resumable checkpoints hold.

The Runner logs its environment, its full config (hundreds of lines) and every logged iteration
at INFO. That log goes to its file in the work directory (``<work_dir>/<time>/<time>.log``);
the console shows OpenMMLab's warnings and errors only, unless ``MIMBENCH_MM_VERBOSE=1``
(:func:`mm_verbose`) asks for everything there too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mmcv.transforms import LoadImageFromFile
from mmengine.hooks import Hook
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import LOOPS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, TRANSFORMS
from mmengine.runner import IterBasedTrainLoop, Runner

from harness.core.data.datasets import DatasetError
from harness.core.measure import count_flops

from .vit_dense import LayerNorm2d

MODELS.register_module(name="MimLN2d", module=LayerNorm2d, force=True)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="MimLayerDecayOptimWrapperConstructor", force=True)
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Layer-wise lr decay: a parameter in backbone layer ``i`` (of ``L + 2`` groups: 0 =
    embeddings, 1..L = blocks, L + 1 = everything above) gets ``lr * rate ** (L + 1 - i)``.

    Norms, biases, position embeddings and relative position tables (ViT's decomposed ones,
    Swin's bias tables) get no weight decay (BEiT / MAE fine-tuning; Swin's configs).
    ``paramwise_cfg = dict(layer_decay_rate=...)``; the model's ``backbone`` must have
    ``num_layers`` and ``layer_id(name)`` (our ViT backbones and ``MimSwin`` do).
    """

    NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "rel_pos_h", "rel_pos_w",
                         "relative_position_bias_table")  # fmt: skip
    #: SwinV2's continuous position bias MLP and cosine-attention logit scales (the reference's
    #: ``no_weight_decay_keywords``).
    NO_DECAY_KEYWORDS = ("cpb_mlp", "logit_scale")

    def add_params(
        self,
        params: list[dict[str, Any]],
        module: torch.nn.Module,
        prefix: str = "",
        is_dcn_module: Any = None,
    ) -> None:
        rate = float(self.paramwise_cfg.get("layer_decay_rate", 1.0))
        backbone = module.backbone
        top = backbone.num_layers + 1
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            lid = (
                backbone.layer_id(name.removeprefix("backbone."))
                if name.startswith("backbone.")
                else top
            )
            no_decay = (
                p.ndim <= 1
                or name.endswith(self.NO_DECAY_SUFFIXES)
                or any(k in name for k in self.NO_DECAY_KEYWORDS)
            )
            key = (lid, no_decay)
            if key not in groups:
                scale = rate ** (top - lid)
                groups[key] = dict(params=[], lr=self.base_lr * scale, lr_scale=scale, layer_id=lid,
                                   weight_decay=0.0 if no_decay else self.base_wd)  # fmt: skip
            groups[key]["params"].append(p)
        params.extend(groups[k] for k in sorted(groups))


@TRANSFORMS.register_module(name="MimLoadImageFromFile", force=True)
class CheckedLoadImageFromFile(LoadImageFromFile):
    """mmcv's ``LoadImageFromFile`` raising :class:`DatasetError` naming an unreadable image."""

    def transform(self, results: dict[str, Any]) -> dict[str, Any] | None:
        path = results.get("img_path")
        try:
            out = super().transform(results)
        except Exception as exc:
            raise DatasetError(
                f"cannot read image {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "replace the file, or remove it and its annotations"
            ) from None
        if out is None or out.get("img") is None:
            raise DatasetError(f"cannot decode image {path}: replace the file or remove it")
        return out


class _SkipAhead:
    """An iterator that answers ``None`` for its first ``skip`` items without loading them."""

    def __init__(self, it: Any, skip: int) -> None:
        self.it, self.skip = it, skip

    def __iter__(self) -> _SkipAhead:
        return self

    def __next__(self) -> Any:
        if self.skip > 0:
            self.skip -= 1
            return None
        return next(self.it)


@LOOPS.register_module(name="MimIterBasedTrainLoop", force=True)
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's iteration loop, except that resuming at iteration ``n`` does not load and
    discard ``n`` batches first (mmengine replays the data loader, hours of image decoding late
    in a 160k-iteration run); the resumed run sees the sampler's order from its start."""

    def run(self) -> Any:
        if self._iter > 0:
            self.dataloader_iterator = _SkipAhead(self.dataloader_iterator, self._iter)
        return super().run()


class RunRecorder(Hook):
    """Collects per-iteration loss and compute time, and the last evaluation's metrics."""

    priority = "VERY_LOW"

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.iter_seconds: list[float] = []
        self.metrics: dict[str, Any] | None = None
        self._t0 = 0.0

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._t0 = time.perf_counter()

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: Any = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        self.iter_seconds.append(time.perf_counter() - self._t0)
        if outputs and "loss" in outputs:
            self.losses.append(float(outputs["loss"].detach()))

    def after_val_epoch(self, runner: Any, metrics: dict[str, Any] | None = None) -> None:
        self.metrics = dict(metrics or {})


class TrainIterFlopCounter(Hook):
    """After training, counts the FLOPs of one more training iteration: the loss forward
    (data preprocessor included) and backward of the model on one batch of the train loader,
    with :func:`harness.core.measure.count_flops`; the optimizer step is left out and the gradients
    it leaves are cleared. ``flops`` and ``batch_size`` hold the total and the batch's images,
    ``memory`` the peak memory (:func:`peak_memory_mb`) before the count, whose dispatch mode
    adds memory of its own.

    torch's counter sees matrix products, convolutions and attention only: custom mmcv ops
    (RoIAlign, NMS, ...) and elementwise work are not counted, so the figure is a lower bound
    (at the default 1024 / 512 px ViT-B runs, dominated by the backbone)."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.flops: float | None = None
        self.batch_size = 0
        self.memory: dict[str, float] = {}

    def after_train(self, runner: Any) -> None:
        self.memory = peak_memory_mb()
        model = runner.model
        batch = next(iter(runner.train_dataloader))
        self.batch_size = len(batch["inputs"])
        model.train()

        def step() -> None:
            with runner.optim_wrapper.optim_context(model):
                data = model.data_preprocessor(batch, True)
                losses = model(**data, mode="loss")
            loss, _ = model.parse_losses(losses)
            loss.backward()

        self.flops = count_flops(step)
        model.zero_grad(set_to_none=True)


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """The one ``getattr`` mmengine's checkpoints pickle: a statistics method of HistoryBuffer
    (its ``_statistics_methods`` holds ``HistoryBuffer.min`` etc.). Anything else is refused."""
    import pickle

    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in (
        "min",
        "max",
        "current",
        "mean",
        *HistoryBuffer._statistics_methods,
    ):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) in a checkpoint")


def _mmengine_checkpoint_types() -> list[Any]:
    """The non-tensor globals of mmengine's own checkpoints (the message hub's history buffers
    hold numpy arrays; MultiStepLR's state a Counter), allowlisted for weights-only loading."""
    import collections

    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        HistoryBuffer, np.ndarray, np.dtype, collections.Counter,
        (multiarray._reconstruct, f"{multiarray.__name__}._reconstruct"),
        (multiarray.scalar, f"{multiarray.__name__}.scalar"),
        (_history_buffer_getattr, "builtins.getattr"),
        *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
    ]  # fmt: skip


@contextlib.contextmanager
def trusted_checkpoint_globals() -> Iterator[None]:
    """Let weights-only ``torch.load`` (the default since torch 2.6, which mmengine's resume
    calls without arguments) read mmengine's own checkpoints: their few extra globals are
    allowlisted, ``getattr`` only in the restricted form above; weights-only stays on, so any
    other global in a file still fails to load."""
    with torch.serialization.safe_globals(_mmengine_checkpoint_types()):
        yield


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (CPU) and peak CUDA allocation, in MiB."""
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


@dataclass
class MMRunResult:
    """What a run left: metrics of the last evaluation, losses, timings."""

    metrics: dict[str, Any]
    losses: list[float]
    iter_seconds: list[float]
    wall_seconds: float
    config_path: Path
    work_dir: Path
    memory: dict[str, float] = field(default_factory=dict)

    def seconds_per_iter(self) -> float:
        """Median compute seconds per training iteration, the first (warm-up) one left out."""
        ts = sorted(self.iter_seconds[1:] or self.iter_seconds)
        return ts[len(ts) // 2] if ts else math.nan


def dump_config(cfg: dict[str, Any], path: Path) -> Path:
    """Write the full mm config as a Python config file (loadable with ``Config.fromfile``)."""
    from mmengine.config import Config

    path.parent.mkdir(parents=True, exist_ok=True)
    Config(cfg).dump(str(path))
    return path


#: Set to 1 to show OpenMMLab's INFO log (its full config, every logged iteration) on the console.
VERBOSE_ENV = "MIMBENCH_MM_VERBOSE"


def mm_verbose() -> bool:
    """Whether ``MIMBENCH_MM_VERBOSE`` asks for OpenMMLab's full log on the console."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class QuietConsoleRunner(Runner):
    """mmengine's Runner whose console handler shows warnings and errors only (unless
    :func:`mm_verbose`); its log file keeps everything at the config's ``log_level``."""

    def build_logger(self, log_level: int | str = "INFO", log_file: str | None = None,
                     **kwargs: Any) -> Any:
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        if not mm_verbose():
            for handler in logger.handlers:
                # the console; the log file's handler is a FileHandler (a StreamHandler subclass)
                if type(handler) is logging.StreamHandler:
                    handler.setLevel(max(handler.level, logging.WARNING))
        return logger


def run_mm(cfg: dict[str, Any], config_path: Path, hooks: Sequence[Hook] = ()) -> MMRunResult:
    """Save ``cfg`` at ``config_path``, then train (resuming from ``work_dir`` when it holds a
    checkpoint) and evaluate with mmengine's Runner.

    Args:
        cfg: The full config (``default_scope`` picks mmdet or mmseg).
        config_path: Where the config is written.
        hooks: Extra hooks registered on the runner (after the run recorder).
    """
    from mmengine.config import Config

    t0 = time.time()
    dump_config(cfg, config_path)
    runner = QuietConsoleRunner.from_cfg(Config(cfg))
    rec = RunRecorder()
    runner.register_hook(rec)
    for hook in hooks:
        runner.register_hook(hook)
    with trusted_checkpoint_globals():
        runner.train()
        if rec.metrics is None and cfg.get("val_dataloader") is not None:
            runner.val()  # a resumed run that had already finished training
    return MMRunResult(
        metrics=rec.metrics or {}, losses=rec.losses, iter_seconds=rec.iter_seconds,
        wall_seconds=time.time() - t0, config_path=config_path, work_dir=Path(cfg["work_dir"]),
        memory=peak_memory_mb(),
    )  # fmt: skip


def finite_or_raise(metrics: dict[str, float], task: str) -> dict[str, float]:
    """Metrics must be finite numbers; a NaN means training diverged."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise RuntimeError(f"{task}: non-finite metrics {bad}: training diverged (lower the lr?)")
    return metrics
