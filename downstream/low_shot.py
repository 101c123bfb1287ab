"""Low-shot evaluation on frozen features: few-shot kNN and L-BFGS logistic regression on
labelled subsets of the train split.

Subsets (each one a column of the leaderboard and a point of the report's curve):

* split lists (``split_lists: {label: file}``): text files of image file names, one per line
  (the standard 1 % / 10 % ImageNet lists of SimCLR / MSN, e.g. ``n01440764_10026.JPEG``, which
  the user supplies); matched against the train split by file name. A list naming an image the
  train split does not hold fails before anything is extracted, naming how many and the first
  few (:func:`match_split_list`).
* fractions: a seeded, class-stratified ``fraction`` of every class (at least one image each).
* shots: exactly ``n`` images of every class, seeded (:func:`stratified_subset`).

Protocols on each subset (features: the class token, or the mean patch token, after the final
norm, from the cache of :mod:`downstream.features`, shared with the linear probe and kNN):

* ``knn``: DINO's weighted kNN (:func:`downstream.knn.knn_predict`) with the subset as the
  memory bank.
* ``logreg``: multinomial logistic regression, full batch, solved by ``torch.optim.LBFGS``
  (strong-Wolfe line search, float64) on centred and L2-normalised features (MSN's
  ``logistic_eval.py`` preprocesses with centring and row normalisation before cyanure's
  L2-penalised multiclass logistic regression; Assran et al., "Masked Siamese Networks",
  ECCV 2022). The L2 penalty is swept over ``l2s`` and chosen on a class-stratified held-out
  part of the subset, then the classifier is refit on the whole subset with it and read on val,
  as DINOv2's ``dinov2/eval/log_regression.py`` (``eval_log_regression``: C swept with cuML's
  L-BFGS logistic regression, chosen on 10 % of train, final model on all of train; Oquab et
  al., 2023). Objective: ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised), i.e.
  scikit-learn's / cuML's ``C = 1 / (l2 * n)``.

Metrics: ``top1_<protocol>_<subset>`` (``top1_logreg_1pct``, ``top1_knn_5shot``,
``top1_logreg_<list label>``); the record's details keep the chosen L2 of each subset, the
held-out accuracy of every L2, and one curve per protocol (share of train labelled vs top-1).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from harness.core.config import DataConfig, EncoderConfig, TaskConfig
from harness.core.data.datasets import (
    check_classification_data,
    eval_transform,
    imagefolder_checked,
    resolve_imagefolder_root,
)
from harness.core.data.imagefolder import DatasetError

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task
from .features import frozen_forward_step
from .knn import knn_predict, pooled_features
from .linear_probe import grid_edges, stratified_holdout, topk_accuracy

#: The default L2 grid: decades from 1e-7 to 1e1 (DINOv2 sweeps C over 10^-6 ... 10^5, which
#: at ImageNet-1 %'s 12.8k images is l2 = 1 / (C n) from about 8e-10 to 78).
DEFAULT_L2S = tuple(10.0**p for p in range(-7, 2))

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


class LowShotConfig(TaskConfig):
    """Low-shot evaluation (see :mod:`downstream.low_shot`).

    Attributes:
        split_lists: Subset label -> a text file of train image names, one per line (blank
            lines and ``#`` comments ignored; a path in a line is reduced to its file name).
        fractions: Seeded class-stratified fractions of train (each class keeps at least one).
        shots: Images per class of the seeded few-shot subsets.
        protocols: ``knn`` and / or ``logreg``.
        k: kNN neighbours (clipped to the subset's size; DINO: 20).
        temperature: kNN vote weight ``exp(similarity / temperature)`` (DINO: 0.07).
        l2s: L2 penalties swept by the logistic regression.
        holdout_fraction: Part of each subset (per class, at least one image of every class
            with two or more) held out to choose the L2.
        max_iter: L-BFGS iterations per fit (DINOv2: 1000).
        pooling: ``cls`` (class token) or ``avg`` (mean patch token; the only one for Swin).
        batch_size_extract: Batch of the feature extraction.
        cache_features: Read / write the on-disk feature cache.
        cache_dir: Feature cache directory (default ``$MIMBENCH_CACHE/features``).
        cache_dtype: Storage dtype of cached features (the solver runs in float64 either way).
        strict_data: Unreadable image files are fatal instead of skipped and counted.
    """

    name: Literal["low_shot"] = "low_shot"
    split_lists: dict[str, str] = Field(default_factory=dict)
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1])
    shots: list[int] = Field(default_factory=lambda: [2, 5])
    protocols: list[Literal["knn", "logreg"]] = Field(
        default_factory=lambda: ["knn", "logreg"], min_length=1
    )
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    l2s: list[float] = Field(default_factory=lambda: list(DEFAULT_L2S), min_length=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    max_iter: int = Field(1000, ge=1)
    pooling: Literal["cls", "avg"] = "cls"
    batch_size_extract: int = Field(128, ge=1)
    cache_features: bool = True
    cache_dir: str | None = None
    cache_dtype: Literal["float32", "float16"] = "float32"
    strict_data: bool = False

    @field_validator("split_lists")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _LABEL.match(k)]
        if bad:
            raise ValueError(f"split_lists labels {bad} must be letters, digits, '.' or '-' "
                             "(they name the metrics), e.g. {1pct: /data/1percent.txt}")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v) or len(set(v)) != len(v):
            raise ValueError(f"fractions must be distinct values in (0, 1], got {v}")
        return v

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"shots must be distinct counts >= 1, got {v}")
        return v

    @field_validator("l2s")
    @classmethod
    def _l2s(cls, v: list[float]) -> list[float]:
        if any(not (x >= 0 and math.isfinite(x)) for x in v):
            raise ValueError(f"l2s must be finite penalties >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _something_to_do(self) -> LowShotConfig:
        if not (self.split_lists or self.fractions or self.shots):
            raise ValueError("low_shot needs at least one subset: split_lists, fractions or shots")
        if "logreg" in self.protocols and 1 in self.shots:
            raise ValueError(
                "logreg chooses its L2 on images held out of the subset: 1-shot leaves none; "
                "drop 1 from shots or set protocols: [knn]"
            )
        labels = [*self.split_lists, *map(fraction_label, self.fractions),
                  *(f"{n}shot" for n in self.shots)]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"subset labels {dup} are given twice (split_lists vs fractions)")
        return self

    def subset_labels(self) -> dict[str, tuple[str, Any]]:
        """Subset label -> (kind, value), in report order: lists, fractions, shots."""
        out: dict[str, tuple[str, Any]] = {k: ("list", v) for k, v in self.split_lists.items()}
        out.update((fraction_label(f), ("fraction", f)) for f in self.fractions)
        out.update((f"{n}shot", ("shots", n)) for n in self.shots)
        return out


def fraction_label(f: float) -> str:
    """``0.01`` -> ``1pct``, ``0.005`` -> ``0.5pct``."""
    return f"{100 * f:g}pct"


def metric_name(protocol: str, label: str) -> str:
    """``top1_<protocol>_<subset label>``."""
    return f"top1_{protocol}_{label}"


# --------------------------------------------------------------------------- subsets


def stratified_subset(labels: torch.Tensor, seed: int, *, shots: int | None = None,
                      fraction: float | None = None) -> torch.Tensor:
    """Sorted indices of a seeded class-stratified subset: exactly ``shots`` of every class, or
    ``max(1, round(fraction * n_c))`` of each class c.

    Raises:
        DatasetError: A class has fewer than ``shots`` images.
    """
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        n = shots if shots is not None else max(1, int(round(len(idx) * float(fraction or 0))))
        if n > len(idx):
            raise DatasetError(
                f"class {c} has {len(idx)} train images, fewer than shots={n}: lower shots or "
                "use a larger train split"
            )
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def read_split_list(path: str | Path) -> list[str]:
    """The image names of a split-list file (blank lines and ``#`` comments skipped): a bare
    file name, or ``<class>/<file>`` where a line has a folder (a longer path keeps its last two
    parts).

    Raises:
        DatasetError: The file is missing or names no image.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"split list {p} does not exist: give a text file of train image "
                           "names, one per line (e.g. n01440764_10026.JPEG)")
    names = [_list_key(line.split("#", 1)[0].strip())
             for line in p.read_text(encoding="utf-8").splitlines()]  # fmt: skip
    names = [n for n in names if n]
    if not names:
        raise DatasetError(f"split list {p} names no image: one file name per line expected")
    return names


def match_split_list(names: list[str], samples: list[tuple[str, int]], source: str) -> list[int]:
    """Indices of the train ``samples`` (path, label) named by ``names`` (matched by file name,
    or by ``<class>/<file>``).

    Raises:
        DatasetError: Names with no train image (how many, the first few), or names matching
            several train images.
    """
    by_name: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(samples):
        p = Path(path)
        by_name.setdefault(p.name, []).append(i)
        by_name.setdefault(f"{p.parent.name}/{p.name}", []).append(i)
    missing = [n for n in dict.fromkeys(names) if n not in by_name]
    if missing:
        raise DatasetError(
            f"split list {source}: {len(missing)} of {len(set(names))} image names are not in "
            f"the train split (first: {', '.join(missing[:5])}); the list must name files of "
            "train/<class>/ (matched by file name)"
        )
    ambiguous = [n for n in dict.fromkeys(names) if len(by_name[n]) > 1]
    if ambiguous:
        raise DatasetError(
            f"split list {source}: {len(ambiguous)} names match several train images (first: "
            f"{', '.join(ambiguous[:5])}); name them as <class>/<file> in the list"
        )
    return sorted({by_name[n][0] for n in names})


def _list_key(line: str) -> str:
    """``<file>`` or ``<class>/<file>`` of a split-list line ("" for an empty one)."""
    parts = Path(line).parts if line else ()
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------- logistic regression


def preprocess(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Centre by ``center`` and L2-normalise rows (MSN's preprocessing), in float64."""
    return F.normalize(x.double() - center.double(), dim=1)


def logreg_objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """``mean CE(x W^T + b, y) + l2 / 2 * ||W||^2``; x ``[N, D]``, W ``[C, D]``, b ``[C]``."""
    return F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 1000,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise :func:`logreg_objective` with full-batch L-BFGS (strong-Wolfe line search).

    Args:
        x: ``[N, D]`` float64 features.
        y: ``[N]`` labels.
        num_classes: C.
        l2: L2 penalty on W.
        max_iter: L-BFGS iterations.
        init: A warm start (W, b) (the previous L2 of a sweep).

    Returns:
        ``(W [C, D], b [C])``, detached.
    """
    d = x.shape[1]
    w0, b0 = init if init is not None else (
        torch.zeros(num_classes, d, dtype=x.dtype, device=x.device),
        torch.zeros(num_classes, dtype=x.dtype, device=x.device),
    )
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-8, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logreg_objective(x, y, w, b, l2)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def logreg_sweep(
    x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, num_classes: int, l2s: list[float],
    holdout_fraction: float, max_iter: int, seed: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Choose the L2 on a held-out part of the subset, refit on all of it, score ``x_val``.

    Args:
        x: ``[N, D]`` raw features of the subset.
        y: ``[N]``.
        x_val: ``[M, D]`` raw features to score.
        num_classes: C.
        l2s: The grid (fitted from the largest down, each warm-started from the previous).
        holdout_fraction: Per class, as :func:`downstream.linear_probe.stratified_holdout`.
        max_iter: L-BFGS iterations per fit.
        seed: Seeds the held-out split.

    Returns:
        ``({"l2", "holdout_top1", "grid": [{"l2", "holdout_top1"}]}, val logits [M, C])``.

    Raises:
        DatasetError: No class of the subset has two images to hold one out.
    """
    fit, hold = stratified_holdout(y.cpu(), holdout_fraction, seed)
    if len(hold) == 0 or len(fit) == 0:
        raise DatasetError(
            "logreg: the subset has no class with two or more images, so none can be held out to "
            "choose the L2 penalty; use larger subsets or protocols: [knn]"
        )
    fit, hold = fit.to(x.device), hold.to(x.device)
    center = x[fit].double().mean(0)
    xf, xh = preprocess(x[fit], center), preprocess(x[hold], center)
    grid, warm = [], None
    for l2 in sorted(l2s, reverse=True):
        warm = fit_logreg(xf, y[fit], num_classes, l2, max_iter, warm)
        acc = topk_accuracy((xh @ warm[0].T + warm[1]).cpu(), y[hold].cpu(), 1)
        grid.append({"l2": l2, "holdout_top1": acc})
    best = max(grid, key=lambda r: r["holdout_top1"])  # first of ties: the largest L2
    center = x.double().mean(0)
    w, b = fit_logreg(preprocess(x, center), y, num_classes, best["l2"], max_iter)
    logits = preprocess(x_val, center) @ w.T + b  # [M, C]
    chosen = {"l2": best["l2"], "holdout_top1": best["holdout_top1"], "grid": grid,
              "num_fit": len(fit), "num_holdout": len(hold)}  # fmt: skip
    return chosen, logits


# --------------------------------------------------------------------------- the task


@register_task("low_shot")
class LowShot(Task):
    """Few-shot kNN and L-BFGS logistic regression on train subsets (see the module docstring)."""

    name = "low_shot"
    version = 1
    metrics = {metric_name(p, s): True for s in LowShotConfig().subset_labels()
               for p in LowShotConfig().protocols}  # fmt: skip
    config_cls = LowShotConfig

    def metric_names(self, cfg: TaskConfig) -> dict[str, bool]:
        """One ``top1_<protocol>_<subset>`` per protocol and subset of the config."""
        assert isinstance(cfg, LowShotConfig)
        return {metric_name(p, s): True for s in cfg.subset_labels() for p in cfg.protocols}

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, and every split list's names in train."""
        assert isinstance(cfg, LowShotConfig)
        root = check_classification_data(data)
        if cfg.split_lists:
            samples = imagefolder_checked(root, "train", None).samples
            for path in cfg.split_lists.values():
                match_split_list(read_split_list(path), samples, path)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """A frozen forward pass (the classifiers work on cached features)."""
        return frozen_forward_step(encoder, batch)

    def bench_images(
        self, cfg: TaskConfig, encoder: EncoderConfig, n_train: int, n_val: int
    ) -> int | None:
        """Features of every train image (shared with the probes' cache) and val image."""
        return n_train + n_val

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, LowShotConfig)
        if cfg.pooling not in encoder.poolings:
            raise ValueError(f"{type(encoder).__name__} has no class token: set pooling: avg")
        t0 = time.time()
        root = resolve_imagefolder_root(ctx.data)
        strict = cfg.strict_data or ctx.data.strict_data
        train = imagefolder_checked(root, "train", None, strict)
        val = imagefolder_checked(root, "val", None, strict)
        lists = {label: match_split_list(read_split_list(path), train.samples, path)
                 for label, path in cfg.split_lists.items()}  # before any extraction
        tf = eval_transform(int(encoder.cfg.img_size), ctx.data.eval_crop_pct)
        ftr, fva, xtr, xva = pooled_features(encoder, cfg, ctx, train, val, tf)
        t_feat = time.time() - t0
        num_classes = len(train.classes)
        ytr, yva = ftr.labels.to(ctx.device), fva.labels
        kept = _kept_train_indices(train.samples, ftr.skipped_files, train.root)
        metrics: dict[str, float] = {}
        subsets: dict[str, Any] = {}
        for label, (kind, value) in cfg.subset_labels().items():
            t1 = time.time()
            if kind == "list":
                idx = _positions(lists[label], kept, label)
            else:
                idx = stratified_subset(ytr.cpu(), ctx.seed, shots=value if kind == "shots"
                                        else None, fraction=value if kind == "fraction" else None)
            idx = idx.to(ctx.device)
            row: dict[str, Any] = {"kind": kind, "value": value, "num_images": int(idx.numel()),
                                   "share_of_train": 100.0 * idx.numel() / max(1, len(ytr))}
            for protocol in cfg.protocols:
                if protocol == "knn":
                    scores = knn_predict(F.normalize(xtr[idx], dim=1), ytr[idx],
                                         F.normalize(xva, dim=1), num_classes, cfg.k,
                                         cfg.temperature)  # fmt: skip
                else:
                    chosen, scores = logreg_sweep(xtr[idx], ytr[idx], xva, num_classes, cfg.l2s,
                                                  cfg.holdout_fraction, cfg.max_iter, ctx.seed)
                    row["logreg"] = chosen
                top1 = topk_accuracy(scores.float().cpu(), yva, 1)
                metrics[metric_name(protocol, label)] = top1
                row[f"{protocol}_top1"] = top1
            row["seconds"] = time.time() - t1
            subsets[label] = row
            ctx.log(f"[low_shot] {label} ({row['num_images']} images): " + ", ".join(
                f"{p} {row[f'{p}_top1']:.2f}" for p in cfg.protocols)
                + (f" (l2 {row['logreg']['l2']:g})" if "logreg" in row else ""))  # fmt: skip
        edges = [dict(e, subset=label, message=f"logreg on {label}: {e['message']}")
                 for label, row in subsets.items() if "logreg" in row
                 for e in grid_edges(row["logreg"]["grid"], "holdout_top1", {"l2": "l2s"})]
        for edge in edges:
            ctx.log(f"[low_shot] WARNING {edge['message']}")
        return TaskResult(
            metrics=metrics,
            details={
                "subsets": subsets,
                "chosen_l2": {k: r["logreg"]["l2"] for k, r in subsets.items() if "logreg" in r},
                "grid_edge": edges,
                "curves": [
                    {"name": p, "x": "train images labelled (%)", "y": f"{p} top-1 (%)",
                     "points": [[r["share_of_train"], r[f"{p}_top1"]] for r in subsets.values()]}
                    for p in cfg.protocols
                ],
                "k": cfg.k, "temperature": cfg.temperature, "pooling": cfg.pooling,
                "num_classes": num_classes,
                "num_train": int(ytr.numel()),
                "num_val": int(yva.numel()),
                "skipped_images": {"train": ftr.num_skipped, "val": fva.num_skipped},
                "feature_cache": {"train": ftr.from_cache, "val": fva.from_cache},
                "feature_seconds": t_feat,
                "total_seconds": time.time() - t0,
            },
        )  # fmt: skip


def _kept_train_indices(samples: list[tuple[str, int]], skipped: list[str],
                        root: str) -> dict[int, int]:
    """Dataset index -> row of the feature matrix (unreadable images have no row)."""
    gone = {str(Path(root) / s) for s in skipped}
    rows: dict[int, int] = {}
    for i, (path, _) in enumerate(samples):
        if str(Path(path)) not in gone:
            rows[i] = len(rows)
    return rows


def _positions(indices: list[int], kept: dict[int, int], label: str) -> torch.Tensor:
    """Feature rows of the dataset ``indices`` of a split list (unreadable images dropped)."""
    rows = [kept[i] for i in indices if i in kept]
    if not rows:
        raise DatasetError(f"split list '{label}': none of its images could be read")
    return torch.tensor(rows, dtype=torch.long)
