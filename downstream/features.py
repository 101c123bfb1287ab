"""Frozen features, extracted once and cached on disk (the fast linear probe and kNN read them).

A cache entry holds, for every image of one split, the class token and the average of the patch
tokens after each of the last ``n`` blocks (each through the encoder's final norm, as DINOv2's
``get_intermediate_layers(norm=True)``), for ``V`` views: view 0 is the evaluation transform
(resize + center crop), views 1..V-1 are random training augmentations seeded by
(seed, view, image index). Images that cannot be decoded are skipped, counted and named on the
log; the entry stores their names, so a strict run fails on them even when the features come
from the cache.

Entries are keyed by what determines the numbers: a hash of the encoder's weights, the dataset
(root, class names, and every file's path, label, size and modification time, so an image
rewritten in place is a new key), the split, the transforms, the device kind, the autocast
precision and the storage dtype. A request is served by any entry with at least as many blocks
and views (same key; views > 1 must share the augmentation), so kNN reuses what the linear probe
extracted. Files are safetensors, written atomically; the default location is
``$MIMBENCH_CACHE/features`` (``~/.cache/mimbench/features``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness.core.data.datasets import (
    SkipTally,
    collate_skipping,
    seed_cpu_rng,
    skipped_message,
    unreadable_image_error,
)
from harness.core.fsutil import atomic_write_bytes, cache_home, canonical_json
from harness.core.tracking import progress
from harness.core.training import autocast_dtype
from pretrain.encoders.base import Encoder

from .base import BenchBatch

FEATURE_CACHE_VERSION = 2  # 2: file sizes and mtimes in the key, skipped files stored


def default_feature_cache_dir() -> Path:
    """``$MIMBENCH_CACHE/features``, or ``~/.cache/mimbench/features``."""
    return cache_home() / "features"


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's class, state-dict keys, shapes, dtypes and bytes."""
    h = hashlib.sha256(type(encoder).__name__.encode())
    for k, v in sorted(encoder.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        # flat first: a 0-dim tensor (batch norm's num_batches_tracked) has no byte view
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(ds: Any) -> str:
    """SHA-256 of an ImageFolder's root, classes and (relative path, label, size, mtime) list.

    Size and modification time (ns) stand for each file's contents: an image rewritten in place
    changes the fingerprint without reading any image (one ``stat`` per file).
    """
    root = Path(ds.root).resolve()
    h = hashlib.sha256(str(root).encode())
    h.update(json.dumps(list(ds.classes)).encode())
    for path, target in ds.samples:
        size, mtime_ns = ds.sample_stat(path)  # a shard member: its size and its shard's mtime
        rel = os.path.relpath(path, root)
        h.update(f"{rel}\t{target}\t{size}\t{mtime_ns}\n".encode())
    return h.hexdigest()


def frozen_forward_step(encoder: nn.Module, batch: BenchBatch) -> Callable[[], None]:
    """The bench step of the tasks that read cached features (fast linear probe, kNN): one
    frozen forward pass, their cost per image (the heads, or the votes, then work on cached
    vectors, which is negligible)."""
    encoder.eval()

    def step() -> None:
        with torch.no_grad(), batch.autocast():
            encoder.forward_features(batch.images)  # [B, N, D]

    return step


@dataclass
class Features:
    """Cached features of one split.

    Attributes:
        feats: ``{'cls' | 'avg': [N, V, n_blocks, D]}`` (blocks in order, the last one last).
        labels: ``[N]``.
        num_skipped: Unreadable images left out.
        seconds: Extraction time (0 when read from the cache).
        path: The cache file (None when caching is off).
        from_cache: Whether the features were read from the cache.
        skipped_files: Paths of the unreadable images, relative to the split folder.
    """

    feats: dict[str, torch.Tensor]
    labels: torch.Tensor
    num_skipped: int
    seconds: float
    path: Path | None
    from_cache: bool
    skipped_files: list[str] = field(default_factory=list)

    @property
    def num_views(self) -> int:
        return next(iter(self.feats.values())).shape[1]

    def select(self, pooling: str, k: int, views: int | None = None) -> torch.Tensor:
        """Linear-probe input of (pooling, last ``k`` blocks): ``[N, V, D']``.

        ``cls`` / ``avg``: that token of each of the last ``k`` blocks, concatenated; ``cls_avg``:
        the class tokens of the last ``k`` blocks and the average patch token of the last block
        (DINOv2's ``avgpool=True`` linear input).
        """
        v = slice(None) if views is None else slice(0, views)
        if pooling in ("cls", "avg"):
            return self.feats[pooling][:, v, -k:].flatten(2)
        if pooling == "cls_avg":
            return torch.cat(
                [self.feats["cls"][:, v, -k:].flatten(2), self.feats["avg"][:, v, -1]], dim=2
            )
        raise ValueError(f"unknown pooling '{pooling}': use cls, avg or cls_avg")


class _ViewDataset(Dataset):
    """View ``v`` of a checked ImageFolder: the eval transform (v = 0) or a seeded augmentation."""

    def __init__(self, base: Any, transform: Any, seed: int, view: int) -> None:
        self.base, self.transform, self.seed, self.view = base, transform, seed, view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        path, target = self.base.samples[index]
        try:
            img = self.base.loader(path)
        except (OSError, ValueError, SyntaxError):
            if self.base.strict:
                return self.base[index]  # raises the DatasetError naming the file
            return None
        if self.view == 0:
            return self.transform(img), target
        s = (self.seed * 1_000_003 + self.view * 100_003 + index) % (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            seed_cpu_rng(s)  # torch.manual_seed's CPU state, without seeding the accelerators
            state = random.getstate()
            random.seed(s)
            try:
                return self.transform(img), target
            finally:
                random.setstate(state)


@torch.no_grad()
def extract(
    encoder: Encoder,
    ds: Any,
    transforms: list[Any],
    n_blocks: int,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    log: Any = None,
    block: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Run the frozen encoder over ``ds`` once per view.

    Args:
        encoder: Encoder wrapper (eval mode is set here; weights are not modified).
        ds: A :class:`harness.core.data.datasets.CheckedImageFolder` (its transform is not used).
        transforms: One transform per view (view 0: the evaluation transform).
        n_blocks: How many last blocks to keep.
        block: Keep the tokens of this one block instead (:meth:`Encoder.block_tokens`;
            ``n_blocks`` must be 1).

    Returns:
        ``({'cls' | 'avg': [N, V, n_blocks, D]}, labels [N], paths of the images skipped)``.

    Raises:
        DatasetError: No image of ``ds`` could be read.
    """

    encoder.eval()
    encoder.to(device)
    amp = autocast_dtype("auto", device)
    pools = encoder.poolings
    per_view: list[dict[str, torch.Tensor]] = []
    labels = torch.empty(0, dtype=torch.long)
    kept_all: torch.Tensor | None = None
    for v, tf in enumerate(transforms):
        loader = DataLoader(
            _ViewDataset(ds, tf, seed, v),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_skipping,
            pin_memory=device.type == "cuda",
        )
        out: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
        ys, kept = [], []
        t0 = time.time()
        for imgs, y, keep in progress(loader, desc=f"features view {v}", unit="batch"):
            kept.append(keep)
            if imgs.numel() == 0:
                continue
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = imgs.to(device, non_blocking=True)
                blocks = (encoder.last_blocks(x, n_blocks) if block is None
                          else [encoder.block_tokens(x, block)])
            for p in pools:
                pooled = torch.stack([encoder.pool(t, p) for t in blocks], dim=1)  # [B, n, D]
                out[p].append(pooled.float().to("cpu", dtype))
            ys.append(y)
        kept_v = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.bool)
        if kept_all is None:
            tally = SkipTally(ds, "")
            tally.add(range(len(kept_v)), kept_v)
            tally.check_readable()  # before any torch.cat of nothing
            kept_all, labels = kept_v, (torch.cat(ys) if ys else labels)
        elif not torch.equal(kept_all, kept_v):
            raise RuntimeError("the set of readable images changed between views")
        per_view.append({p: torch.cat(f) if f else torch.empty(0) for p, f in out.items()})
        if log is not None:
            log(f"[features] view {v}: {int(kept_v.sum())} images in {time.time() - t0:.1f}s")
    feats = {p: torch.stack([pv[p] for pv in per_view], dim=1) for p in pools}  # [N, V, n, D]
    skipped = (~kept_all).nonzero().flatten().tolist() if kept_all is not None else []
    return feats, labels, sorted(os.path.relpath(ds.samples[i][0], ds.root) for i in skipped)


def split_key(
    encoder_hash: str, ds: Any, split: str, eval_tf: Any, device: torch.device,
    dtype: torch.dtype, block: int | None = None,
) -> str:
    """The cache key of one split's frozen outputs: encoder weights, dataset files, split, eval
    transform, device kind, autocast precision and storage dtype (the attentive probe's token
    cache shares it), and the block read when one is named (keys without one are unchanged)."""
    amp = autocast_dtype("auto", device)
    parts = {
        "v": FEATURE_CACHE_VERSION,
        "encoder": encoder_hash,
        "dataset": dataset_fingerprint(ds),
        "split": split,
        "eval_transform": repr(eval_tf),
        "device": device.type,
        "amp": str(amp),
        "dtype": str(dtype),
    }
    if block is not None:
        parts["block"] = block
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:24]


def _aug_key(aug_tf: Any, seed: int) -> str:
    return hashlib.sha256(canonical_json({"aug": repr(aug_tf), "seed": seed}).encode()).hexdigest()[
        :12
    ]


def _find(cache_dir: Path, key: str, n_blocks: int, views: int, aug: str) -> Path | None:
    """A cache file of ``key`` with at least ``n_blocks`` blocks and ``views`` views."""
    best = None
    for p in cache_dir.glob(f"{key}-*.safetensors"):
        try:
            _, v, a, b = p.stem.split("-")
            v_n, b_n = int(v[1:]), int(b[1:])
        except ValueError:
            continue
        fits = b_n >= n_blocks and v_n >= views and (views == 1 or a == aug)
        if fits and (best is None or (v_n, b_n) < best[0]):
            best = ((v_n, b_n), p)
    return best[1] if best else None


def get_features(
    encoder: Encoder,
    ds: Any,
    split: str,
    eval_tf: Any,
    n_blocks: int,
    device: torch.device,
    views: int = 1,
    aug_tf: Any = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 128,
    num_workers: int = 0,
    log: Any = None,
    encoder_hash: str | None = None,
    strict: bool | None = None,
    block: int | None = None,
) -> Features:
    """Features of ``ds`` (one split) from the cache, or extracted and cached.

    Unreadable images are left out and named on ``log`` (once, whether the features come from
    the cache or not).

    Args:
        encoder: Frozen encoder wrapper.
        ds: A checked ImageFolder of the split.
        split: Split name (part of the key).
        eval_tf: Evaluation transform (view 0).
        n_blocks: Last blocks to keep (clipped to what the encoder has).
        device: Where the encoder runs.
        views: 1, or K > 1 for K - 1 extra augmented views of each image.
        aug_tf: Augmentation of views 1..K-1 (needed when ``views > 1``).
        seed: Seed of the augmented views.
        cache_dir: Cache directory (default :func:`default_feature_cache_dir`).
        use_cache: Read and write the cache.
        dtype: Storage dtype (float16 halves memory, e.g. for ImageNet).
        encoder_hash: Precomputed :func:`encoder_fingerprint`.
        strict: Unreadable images are fatal, also when a non-strict run cached the features
            (default: ``ds.strict``).
        block: Read the tokens of this block (0-based, negative from the last) instead of the
            last ``n_blocks`` (:meth:`Encoder.block_tokens`); the features then hold that one.

    Raises:
        DatasetError: ``strict`` and an image is unreadable, or no image of ``ds`` is readable.
    """

    n_blocks = 1 if block is not None else max(1, min(n_blocks, encoder.num_feature_blocks))
    if views > 1 and aug_tf is None:
        raise ValueError("views > 1 needs an augmentation transform")
    strict = bool(getattr(ds, "strict", False)) if strict is None else strict
    cache = Path(cache_dir).expanduser() if cache_dir else default_feature_cache_dir()
    got: Features | None = None
    key = aug = ""
    if use_cache:
        key = split_key(
            encoder_hash or encoder_fingerprint(encoder), ds, split, eval_tf, device, dtype, block
        )
        aug = _aug_key(aug_tf, seed) if views > 1 else "x"
        hit = _find(cache, key, n_blocks, views, aug)
        if hit is not None:
            got = _read_entry(hit, views, n_blocks)
            if log is not None:
                log(f"[features] {split}: read from cache {hit.name}")
            if strict and got.skipped_files:  # the key pins the files: they are unreadable still
                raise unreadable_image_error(
                    Path(ds.root) / got.skipped_files[0],
                    f"one of {got.num_skipped} that the non-strict run which cached these "
                    "features skipped",
                )
    if got is None:
        path = cache / f"{key}-v{views}-{aug}-b{n_blocks}.safetensors" if use_cache else None
        got = _extract_and_store(
            encoder, ds, split, [eval_tf] + [aug_tf] * (views - 1), n_blocks, device, seed,
            dtype, batch_size, num_workers, log, path, block,
        )  # fmt: skip
    if got.skipped_files and log is not None:  # once per split, from the cache or not
        log(skipped_message(split, Path(ds.root), got.skipped_files, len(ds)))
    return got


def _read_entry(path: Path, views: int, n_blocks: int) -> Features:
    """The first ``views`` views and last ``n_blocks`` blocks of the cache file ``path``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    feats = {p: t[:, :views, -n_blocks:] for p, t in tensors.items() if p in ("cls", "avg")}
    skipped = json.loads(meta.get("skipped_files", "[]"))
    return Features(feats, tensors["labels"], len(skipped), 0.0, path, True, skipped)


def _extract_and_store(
    encoder: Encoder,
    ds: Any,
    split: str,
    tfs: list[Any],
    n_blocks: int,
    device: torch.device,
    seed: int,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
    log: Any,
    path: Path | None,
    block: int | None = None,
) -> Features:
    """Extract the features of ``ds`` (one transform per view; of one ``block`` when named) and
    write them to ``path`` (None: caching off)."""
    from safetensors.torch import save

    t0 = time.time()
    feats, labels, skipped = extract(
        encoder, ds, tfs, n_blocks, device, batch_size, num_workers, seed, dtype, log, block
    )
    secs = time.time() - t0
    if path is not None:
        blob = save(
            {**{p: t.contiguous() for p, t in feats.items()}, "labels": labels.contiguous()},
            metadata={
                "num_skipped": str(len(skipped)),
                "skipped_files": json.dumps(skipped),
                "split": split,
                "root": str(ds.root),
                "seconds": f"{secs:.3f}",
            },
        )
        atomic_write_bytes(path, blob)
    return Features(feats, labels, len(skipped), secs, path, False, skipped)
