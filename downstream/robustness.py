"""The robustness suite: a classifier from an earlier stage evaluated on ImageNet's
distribution-shift sets.

The classifier is the one an earlier task of the same encoder and seed saved
(:mod:`downstream.classifier`): ``classifier: linear_probe`` (the fast probe's chosen head),
``attentive_probe`` (its chosen last-block head) or ``finetune`` (the fine-tuned model); the
suite lists that task before ``robustness``. Sets (``sets``; each read from ``root/<folder>``,
:data:`DEFAULT_PATHS`, or from ``paths``):

* ``imagenet_a`` (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021) and
  ``imagenet_r`` (Hendrycks et al., "The Many Faces of Robustness", ICCV 2021): wnid folders of
  a 200-class subset. Both argmaxes are reported: over the subset's classes (``*_top1_subset``,
  the papers' protocol: the logits of the other 800 classes are dropped) and over every class
  of the classifier (``*_top1_full``). The subset is read from the set's own folder names.
* ``imagenet_sketch`` (Wang et al., NeurIPS 2019): wnid folders of all classes; ``sketch_top1``.
* ``imagenet_v2`` (Recht et al., ICML 2019): the released ``*-format-val`` folders are named
  by class index ``0..999`` (the index in the sorted wnid list, which the classifier's label
  order is); they are mapped by their integer value, not by ImageFolder's string order
  (``10`` sorts before ``2``); ``v2_top1``.
* ``real`` (Beyer et al., "Are we done with ImageNet?", 2020): ``real.json`` holds, per val
  image of the suite's dataset (in file-name order: ``ILSVRC2012_val_00000001.JPEG`` first), the
  list of its valid class indices; an empty list excludes the image. ``real_top1`` is the share
  of the non-excluded images whose prediction is in their list.
* ``imagenet_c`` (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
  Corruptions and Perturbations", ICLR 2019): ``<corruption>/<severity 1..5>/<wnid>/``. Per
  corruption c with E_{s,c} the top-1 error at severity s, CE_c = sum_s E_{s,c} / sum_s
  E^AlexNet_{s,c}; ``c_mce`` is the mean of CE_c (in %) over the corruptions of
  :data:`ALEXNET_ERR` present, ``c_error`` the unnormalised mean error over the same.

Every set's classes must map onto the classifier's (checked before anything runs against the
suite's train classes, and again against the saved classifier's): a set naming a class the
classifier does not have fails naming the unmapped classes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader

from downstream.classifier import CLASSIFIERS, build_classifier, read_classifier
from harness.core.config import DataConfig, TaskConfig
from harness.core.data.datasets import (
    CheckedImageFolder,
    SkipTally,
    check_imagefolder_split,
    collate_skipping,
    eval_transform,
    imagefolder_checked,
    imagefolder_classes,
    resolve_imagefolder_root,
    resolve_shapes_root,
)
from harness.core.data.imagefolder import DatasetError
from harness.core.data.shapes import ShapesSpec
from harness.core.data.shapes_robust import ensure_shapes_robust
from harness.core.registry import did_you_mean

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .features import frozen_forward_step

SetName = Literal["imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2", "real",
                  "imagenet_c"]  # fmt: skip
ALL_SETS: tuple[str, ...] = ("imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2", "real",
                             "imagenet_c")  # fmt: skip
#: Where each set is looked for under ``root`` (the releases' folder names where known; the
#: synthetic copies, :mod:`harness.core.data.shapes_robust`, use the same).
DEFAULT_PATHS: dict[str, str] = {
    "imagenet_a": "imagenet-a", "imagenet_r": "imagenet-r", "imagenet_sketch": "imagenet-sketch",
    "imagenet_v2": "imagenetv2-matched-frequency-format-val", "real": "real.json",
    "imagenet_c": "imagenet-c",
}  # fmt: skip

#: AlexNet's top-1 error on ImageNet-C per corruption, averaged over severities 1..5 (a
#: fraction), in ImageNet-C's corruption order. Source: google-research/augmix ``imagenet.py``
#: (``CORRUPTIONS`` / ``ALEXNET_ERR``, commented there "Raw AlexNet errors taken from
#: https://github.com/hendrycks/robustness"; the same values are in mmpretrain's corruption
#: metric, ``get_ce_alexnet``). hendrycks/robustness ``ImageNet-C/test.py`` itself prints the
#: unnormalised errors only. The mean over severities stands for their sum: sum_s E / sum_s
#: E^AlexNet = mean_s E / mean_s E^AlexNet with all five severities.
ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}  # fmt: skip
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


class RobustnessDataError(DatasetError):
    """A robustness set is missing, in the wrong layout, or names classes the classifier lacks."""


class RobustnessConfig(TaskConfig):
    """The robustness suite (see :mod:`downstream.robustness`).

    Attributes:
        classifier: The earlier task of the suite whose saved classifier is evaluated
            (``linear_probe``, ``attentive_probe`` or ``finetune``).
        sets: The sets evaluated.
        root: Folder holding the sets under their :data:`DEFAULT_PATHS` names; None: the
            synthetic copies of the shapes dataset when ``data.source`` is ``shapes``.
        paths: Per set, a path that replaces ``root/<default name>``.
        batch_size: Images per forward pass.
        strict_data: Unreadable image files are fatal instead of skipped and counted.
    """

    name: Literal["robustness"] = "robustness"
    classifier: str = "linear_probe"
    sets: list[SetName] = Field(default_factory=lambda: list(ALL_SETS), min_length=1)
    root: str | None = None
    paths: dict[SetName, str] = Field(default_factory=dict)
    batch_size: int = Field(128, ge=1)
    strict_data: bool = False

    @field_validator("sets")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"sets must be distinct, got {v}")
        return v

    @field_validator("classifier")
    @classmethod
    def _saves_a_classifier(cls, v: str) -> str:
        if v not in CLASSIFIERS:
            raise ValueError(f"task '{v}' saves no classifier;{did_you_mean(v, CLASSIFIERS.names())}"
                             f" use one of {', '.join(CLASSIFIERS.names())}")
        return v


# --------------------------------------------------------------------------- metrics


def subset_and_full_top1(logits: torch.Tensor, targets: torch.Tensor,
                         subset: torch.Tensor) -> tuple[float, float]:  # fmt: skip
    """Top-1 (%) with the argmax over ``subset``'s classes and over every class.

    Args:
        logits: ``[N, C]``.
        targets: ``[N]`` class indices (each in ``subset``).
        subset: ``[S]`` class indices the set covers.
    """
    if targets.numel() == 0:
        return 0.0, 0.0
    pred_sub = subset[logits[:, subset].argmax(dim=1)]  # [N] back in 0..C-1
    pred_full = logits.argmax(dim=1)
    return (100.0 * (pred_sub == targets).float().mean().item(),
            100.0 * (pred_full == targets).float().mean().item())  # fmt: skip


def any_match_accuracy(preds: list[int], labels: list[list[int]]) -> tuple[float, int]:
    """ReaL accuracy (%): share of the images with a non-empty label list whose prediction is
    in it, and how many images that is."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} label lists")
    kept = [(p, ls) for p, ls in zip(preds, labels, strict=True) if ls]
    if not kept:
        return 0.0, 0
    return 100.0 * sum(p in ls for p, ls in kept) / len(kept), len(kept)


def mean_corruption_error(errors: dict[str, dict[int, float]],
                          baseline: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """mCE (Hendrycks & Dietterich 2019) from top-1 errors (%) per corruption and severity.

    Args:
        errors: ``{corruption: {severity: error %}}``, severities 1..5 each.
        baseline: AlexNet's error per corruption averaged over severities 1..5 (a fraction).

    Returns:
        ``mce`` (%; None without a baseline corruption), ``mean_error`` (%, over the same
        corruptions), ``ce`` per corruption (%), ``corruptions`` used and ``ignored``.
    """
    used = [c for c in errors if c in baseline]
    ce = {c: 100.0 * sum(errors[c].values()) / (len(errors[c]) * 100.0 * baseline[c])
          for c in used}  # fmt: skip
    mean_err = [sum(errors[c].values()) / len(errors[c]) for c in used]
    return {
        "mce": sum(ce.values()) / len(ce) if ce else None,
        "mean_error": sum(mean_err) / len(mean_err) if mean_err else None,
        "ce": ce, "corruptions": used, "ignored": sorted(set(errors) - set(used)),
    }  # fmt: skip


# --------------------------------------------------------------------------- layouts


def class_targets(set_classes: list[str], classes: list[str], by_index: bool,
                  where: str) -> list[int]:  # fmt: skip
    """The classifier's class index of each of a set's class folders.

    Args:
        set_classes: The set's folder names.
        classes: The classifier's class names, in label order.
        by_index: Folders are named by class index (ImageNet-V2) instead of by class name.
        where: The set's path (for the message).

    Raises:
        RobustnessDataError: Naming the folders that map onto no class of the classifier.
    """
    if by_index:
        ok = {str(i): i for i in range(len(classes))}
    else:
        ok = {c: i for i, c in enumerate(classes)}
    bad = [c for c in set_classes if c not in ok]
    if bad:
        what = (f"class indices 0..{len(classes) - 1}" if by_index
                else f"the classifier's {len(classes)} classes (e.g. {', '.join(classes[:3])})")
        raise RobustnessDataError(
            f"{where}: {len(bad)} class folder(s) map onto none of {what}: "
            f"{', '.join(bad[:10])}{', ...' if len(bad) > 10 else ''}; the set must use the "
            "classifier's class names (wnids)" + (" / indices" if by_index else "")
            + " (is it the set for this dataset?)"
        )  # fmt: skip
    return [ok[c] for c in set_classes]


def corruption_layout(root: Path) -> dict[str, list[str]]:
    """ImageNet-C's folders: ``{corruption: class folders}``, every corruption with severity
    folders 1..5 holding the same classes.

    Raises:
        RobustnessDataError: Naming what is missing (no corruption folder, a severity folder,
            differing classes).
    """
    if not root.is_dir():
        raise RobustnessDataError(f"{root} is missing: ImageNet-C's layout is "
                                  "<root>/<corruption>/<severity 1..5>/<wnid>/*.JPEG")
    out: dict[str, list[str]] = {}
    for cdir in sorted(d for d in root.iterdir() if d.is_dir()):
        have = sorted(d.name for d in cdir.iterdir() if d.is_dir())
        if have != [str(s) for s in SEVERITIES]:
            raise RobustnessDataError(
                f"{cdir} holds severity folders {have}, not 1..5: mCE sums the errors of all "
                "five severities (ImageNet-C's layout <corruption>/<severity 1..5>/<wnid>/)"
            )
        per = [check_imagefolder_split(cdir / str(s)) for s in SEVERITIES]
        if any(p != per[0] for p in per):
            raise RobustnessDataError(f"{cdir}: the severity folders hold different classes")
        out[cdir.name] = per[0]
    if not any(c in ALEXNET_ERR for c in out):
        raise RobustnessDataError(
            f"{root} holds no ImageNet-C corruption folder (found {sorted(out) or 'none'}); "
            f"expected some of {', '.join(ALEXNET_ERR)}"
        )
    return out


def read_real_labels(path: Path, n_val: int, num_classes: int) -> list[list[int]]:
    """``real.json``: one list of class indices per val image.

    Raises:
        RobustnessDataError: The file is missing, not a list of lists of class indices, or
            not one list per val image.
    """
    if not path.is_file():
        raise RobustnessDataError(f"{path} is missing: ReaL labels are real.json, a list with "
                                  "one list of valid class indices per val image")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RobustnessDataError(f"{path} is not JSON: {exc}") from None
    if not isinstance(labels, list) or not all(
        isinstance(ls, list) and all(isinstance(x, int) and 0 <= x < num_classes for x in ls)
        for ls in labels
    ):
        raise RobustnessDataError(f"{path} must be a list of lists of class indices in "
                                  f"0..{num_classes - 1} (one list per val image)")
    if len(labels) != n_val:
        raise RobustnessDataError(
            f"{path} holds {len(labels)} label lists but the val split has {n_val} images: "
            "real.json has one list per val image, in file-name order"
        )
    return labels


def val_in_name_order(val: CheckedImageFolder) -> list[int]:
    """Indices of the val samples sorted by file name (real.json's order)."""
    return sorted(range(len(val.samples)), key=lambda i: Path(val.samples[i][0]).name)


# --------------------------------------------------------------------------- the task


def metric_name(metric: str, classifier: str) -> str:
    """``<metric>@<classifier>``, e.g. ``a_top1_subset@linear_probe``."""
    return f"{metric}@{classifier}"



@register_task("robustness")
class Robustness(Task):
    """The robustness suite (see the module docstring)."""

    name = "robustness"
    version = 1
    #: Each set's metrics (name -> higher_is_better), before :func:`metric_name` adds the
    #: classifier.
    SET_METRICS: dict[str, dict[str, bool]] = {
        "imagenet_a": {"a_top1_subset": True, "a_top1_full": True},
        "imagenet_r": {"r_top1_subset": True, "r_top1_full": True},
        "imagenet_sketch": {"sketch_top1": True}, "imagenet_v2": {"v2_top1": True},
        "real": {"real_top1": True}, "imagenet_c": {"c_mce": False, "c_error": False},
    }  # fmt: skip
    metrics = {metric_name(m, "linear_probe"): hib for per in SET_METRICS.values()
               for m, hib in per.items()}  # fmt: skip
    config_cls = RobustnessConfig

    def metric_names(self, cfg: TaskConfig) -> dict[str, bool]:
        """The metrics of the sets of ``cfg``, each named with its classifier
        (:func:`metric_name`), so that one suite's robustness runs of several classifiers
        are separate leaderboard columns."""
        assert isinstance(cfg, RobustnessConfig)
        return {metric_name(m, cfg.classifier): hib
                for s in cfg.sets for m, hib in self.SET_METRICS[s].items()}  # fmt: skip

    def inputs(self, cfg: TaskConfig) -> tuple[str, ...]:
        """The task whose saved classifier is evaluated."""
        assert isinstance(cfg, RobustnessConfig)
        return (cfg.classifier,)

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """Every set's layout, and its classes against the suite's train classes (which the
        classifier is trained on)."""
        assert isinstance(cfg, RobustnessConfig)
        root = resolve_imagefolder_root(data)
        classes = imagefolder_classes(root, "train")
        for s in cfg.sets:
            self._check_set(s, set_path(cfg, data, s), classes, root)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the classifier's cost per image is its encoder's)."""
        return frozen_forward_step(encoder, batch)

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, RobustnessConfig)
        t0 = time.time()
        if cfg.classifier not in ctx.inputs:
            raise RobustnessDataError(
                f"robustness evaluates the classifier of task '{cfg.classifier}' but no such "
                f"stage was handed over: list '{cfg.classifier}' before 'robustness' in tasks"
            )
        saved = read_classifier(ctx.inputs[cfg.classifier], cfg.classifier)
        root = resolve_imagefolder_root(ctx.data)
        for s in cfg.sets:  # against the classifier itself, before any image is read
            self._check_set(s, set_path(cfg, ctx.data, s), saved.classes, root)
        model = build_classifier(encoder, saved).to(ctx.device)
        tf = eval_transform(int(encoder.cfg.img_size), ctx.data.eval_crop_pct)
        ev = _Evaluator(model, tf, ctx, cfg)
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {"classifier": {"task": saved.task, "spec": saved.spec,
                                                  "num_classes": len(saved.classes)},
                                   "sets": {}, "skipped_images": {}}  # fmt: skip
        for s in cfg.sets:
            t1 = time.time()
            m, d = self._evaluators()[s](ev, set_path(cfg, ctx.data, s), saved.classes, root)
            d["seconds"] = time.time() - t1
            metrics.update(m)
            details["sets"][s] = d
            ctx.log(f"[robustness] {s}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items())
                    + f" ({d['seconds']:.1f}s)")  # fmt: skip
        details["skipped_images"] = ev.skipped
        details["total_seconds"] = time.time() - t0
        return TaskResult(metrics={metric_name(k, cfg.classifier): v for k, v in metrics.items()},
                          details=details)  # fmt: skip

    # ------------------------------------------------------------------ per set

    def _evaluators(self) -> dict[str, Callable[..., tuple[dict[str, float], dict[str, Any]]]]:
        """The evaluation of each set: ``(evaluator, path, classes, data root) -> (metrics,
        details)``."""
        return {"imagenet_a": self._eval_imagenet_a, "imagenet_r": self._eval_imagenet_r,
                "imagenet_sketch": self._eval_imagenet_sketch,
                "imagenet_v2": self._eval_imagenet_v2, "real": self._eval_real,
                "imagenet_c": self._eval_imagenet_c}  # fmt: skip

    @staticmethod
    def _check_set(s: str, path: Path, classes: list[str], data_root: Path) -> None:
        if s == "real":
            n_val = len(imagefolder_checked(data_root, "val", None).samples)
            read_real_labels(path, n_val, len(classes))
        elif s == "imagenet_c":
            for c, folders in corruption_layout(path).items():
                class_targets(folders, classes, False, str(path / c))
        else:
            if not path.is_dir():
                raise RobustnessDataError(
                    f"{path} is missing: {s} is an ImageFolder of class folders "
                    + ("named by class index 0..C-1" if s == "imagenet_v2" else "named by wnid")
                    + " (set task.root or task.paths)"
                )
            class_targets(check_imagefolder_split(path), classes, s == "imagenet_v2", str(path))

    @staticmethod
    def _eval_subset(ev: _Evaluator, path: Path, classes: list[str], prefix: str
                     ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        logits, targets = ev.logits(path, classes, False)
        subset = torch.tensor(sorted(set(class_targets(
            check_imagefolder_split(path), classes, False, str(path)))))  # fmt: skip
        sub, full = subset_and_full_top1(logits, targets, subset)
        return ({f"{prefix}_top1_subset": sub, f"{prefix}_top1_full": full},
                {"images": len(targets), "classes": len(subset)})  # fmt: skip

    def _eval_imagenet_a(self, ev: _Evaluator, path: Path, classes: list[str], _: Path
                         ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        return self._eval_subset(ev, path, classes, "a")

    def _eval_imagenet_r(self, ev: _Evaluator, path: Path, classes: list[str], _: Path
                         ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        return self._eval_subset(ev, path, classes, "r")

    @staticmethod
    def _eval_imagenet_sketch(ev: _Evaluator, path: Path, classes: list[str], _: Path
                              ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        top1, n = ev.top1(path, classes, False)
        return {"sketch_top1": top1}, {"images": n}

    @staticmethod
    def _eval_imagenet_v2(ev: _Evaluator, path: Path, classes: list[str], _: Path
                          ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        top1, n = ev.top1(path, classes, True)
        return {"v2_top1": top1}, {"images": n}

    @staticmethod
    def _eval_real(ev: _Evaluator, path: Path, classes: list[str], data_root: Path
                   ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        val = imagefolder_checked(data_root, "val", ev.tf, ev.strict)
        labels = read_real_labels(path, len(val.samples), len(classes))
        order = val_in_name_order(val)
        preds = ev.predictions(val)  # by sample index; -1 for a skipped image
        kept = [(preds[i], labels[k]) for k, i in enumerate(order) if preds[i] >= 0]
        acc, n = any_match_accuracy([p for p, _ in kept], [ls for _, ls in kept])
        return {"real_top1": acc}, {"images": n, "excluded": sum(not ls for ls in labels)}

    @staticmethod
    def _eval_imagenet_c(ev: _Evaluator, path: Path, classes: list[str], _: Path
                         ) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
        errors: dict[str, dict[int, float]] = {}
        folders = corruption_layout(path)
        for c in folders:
            if c not in ALEXNET_ERR:  # e.g. ImageNet-C's extra corruptions: not in the mCE
                continue
            errors[c] = {s: 100.0 - ev.top1(path / c / str(s), classes, False)[0]
                         for s in SEVERITIES}  # fmt: skip
        got = mean_corruption_error(errors, ALEXNET_ERR)
        missing = [c for c in ALEXNET_ERR if c not in errors]
        return ({"c_mce": got["mce"], "c_error": got["mean_error"]},
                {"errors": {c: {str(s): e for s, e in v.items()} for c, v in errors.items()},
                 "ce": got["ce"], "missing_corruptions": missing,
                 "ignored_corruptions": sorted(set(folders) - set(ALEXNET_ERR)),
                 "baseline": "AlexNet, google-research/augmix imagenet.py ALEXNET_ERR"})  # fmt: skip


def set_path(cfg: RobustnessConfig, data: DataConfig, s: str) -> Path:
    """Where set ``s`` is read: ``paths[s]``, else ``root/<default name>``, else (shapes data)
    the synthetic copies.

    Raises:
        RobustnessDataError: No ``root`` and the data is not the synthetic dataset.
    """
    if s in cfg.paths:
        return Path(cfg.paths[s]).expanduser()  # type: ignore[index]
    if cfg.root is not None:
        return Path(cfg.root).expanduser() / DEFAULT_PATHS[s]
    if data.source != "shapes":
        raise RobustnessDataError(
            f"robustness set {s}: set task.root to the folder holding "
            f"{', '.join(DEFAULT_PATHS[x] for x in cfg.sets)} (or task.paths.{s})"
        )
    resolve_shapes_root(data)  # the val split real.json refers to
    return ensure_shapes_robust(ShapesSpec(**data.shapes.model_dump())) / DEFAULT_PATHS[s]


class _Evaluator:
    """Runs the classifier over ImageFolders, skipping (or, strict, failing on) unreadable
    files and counting them per folder."""

    def __init__(self, model: nn.Module, tf: Any, ctx: TaskContext, cfg: RobustnessConfig) -> None:
        self.model, self.tf, self.ctx, self.cfg = model, tf, ctx, cfg
        self.strict = cfg.strict_data or ctx.data.strict_data
        self.skipped: dict[str, int] = {}

    def _batches(self, ds: CheckedImageFolder) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """``(dataset indices kept, logits [K, C], raw labels [K])`` per batch."""
        loader = DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False,
                            num_workers=self.ctx.data.num_workers, collate_fn=collate_skipping)
        tally = SkipTally(ds, Path(ds.root).name)
        start = 0
        with torch.no_grad():
            for x, y, keep in loader:
                idx = list(range(start, start + len(keep)))
                tally.add(idx, keep)
                start += len(keep)
                if x.numel() == 0:
                    continue
                logits = self.model(x.to(self.ctx.device)).float().cpu()  # [K, C]
                yield [i for i, k in zip(idx, keep.tolist(), strict=True) if k], logits, y
        tally.report(self.ctx.log)
        tally.check_readable()
        if tally.num_skipped:
            self.skipped[str(ds.root)] = tally.num_skipped

    def logits(self, path: Path, classes: list[str], by_index: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Logits ``[N, C]`` and the classifier's class index of each image ``[N]``."""
        ds = CheckedImageFolder(str(path), transform=self.tf, strict=self.strict)
        to_cls = torch.tensor(class_targets(list(ds.classes), classes, by_index, str(path)))
        ls, ys = [], []
        for _, lg, y in self._batches(ds):
            ls.append(lg)
            ys.append(to_cls[y])
        if not ls:
            return torch.empty(0, len(classes)), torch.empty(0, dtype=torch.long)
        return torch.cat(ls), torch.cat(ys)

    def top1(self, path: Path, classes: list[str], by_index: bool) -> tuple[float, int]:
        """Top-1 (%) over every class of the classifier, and the images counted."""
        ds = CheckedImageFolder(str(path), transform=self.tf, strict=self.strict)
        to_cls = torch.tensor(class_targets(list(ds.classes), classes, by_index, str(path)))
        hit = n = 0
        for _, lg, y in self._batches(ds):
            hit += int((lg.argmax(dim=1) == to_cls[y]).sum())
            n += len(y)
        return (100.0 * hit / n if n else 0.0), n

    def predictions(self, ds: CheckedImageFolder) -> list[int]:
        """The argmax of every sample of ``ds`` by index (-1 where unreadable)."""
        out = [-1] * len(ds.samples)
        for idx, lg, _ in self._batches(ds):
            for i, p in zip(idx, lg.argmax(dim=1).tolist(), strict=True):
                out[i] = int(p)
        return out
