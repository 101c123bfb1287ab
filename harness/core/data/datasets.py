"""Image datasets and transforms: ImageFolder roots (ImageNet-1k's layout, or the embedded
synthetic "shapes" generated on demand), with a clear message for a wrong layout.

One ImageFolder loader serves pretraining and every classification task:
:func:`imagefolder_checked`; a shard dataset (:mod:`harness.core.data.shards`, found by its
manifest or named by ``data.layout: shards``) is read through the same functions, in the same
sample order. Unreadable image files are skipped (``None`` samples, dropped by
:func:`collate_skipping`), counted and named once on the log (:class:`SkipTally`), or fatal with
``strict``; a split none of whose images decodes, and a classification split with a single
class, are errors that say so.

Augmentation randomness is seeded per (seed, epoch, sample index) inside
:class:`SeededDataset`, so a batch's content depends on neither the number of loader workers nor
on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from harness.core.config import DataConfig
from harness.core.config.recipe import AUGMENTS
from harness.core.data.imagefolder import (  # noqa: F401  (re-exported: the readers' names)
    IMG_EXTENSIONS,
    CheckedImageFolder,
    Crops,
    DatasetError,
    LazyDecode,
    check_imagefolder_split,
    decode_sample,
    has_images,
    seed_cpu_rng,
    stack_images,
    unreadable_image_error,
)
from harness.core.data.shapes import ShapesSpec, ensure_shapes
from harness.core.data.shards import ShardImageFolder, is_shard_root, read_manifest, split_manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_imagefolder_root(data: DataConfig) -> Path:
    """The ImageFolder root (holding ``train/`` and ``val/``) that ``data`` names.

    ``source: shapes`` generates (or reuses from the cache) the synthetic dataset. A shard
    dataset's root is returned as it is (its manifest read and checked); ``data.layout`` other
    than ``auto`` insists on one layout.

    Raises:
        DatasetError: The path is missing, its layout is wrong, or not the one ``data.layout``
            names.
    """
    if data.source == "shapes":
        if data.layout == "shards":
            raise DatasetError(
                "data.layout is 'shards' but data.source is 'shapes' (an ImageFolder): write its "
                "shards with `mimbench data synth --out D && mimbench data shard D/imagefolder "
                "--out S` and set data.source to S"
            )
        return resolve_shapes_root(data) / "imagefolder"
    root = Path(data.source).expanduser()
    if not root.exists():
        raise DatasetError(
            f"dataset path {root} does not exist: set data.source to an ImageFolder root holding "
            "train/<class>/*.jpg and val/<class>/*.jpg (ImageNet-1k's layout), a shard dataset "
            "(`mimbench data shard`), or 'shapes'"
        )
    if _layout(root, data.layout) == "shards":
        read_manifest(root)
        return root
    if data.stream:
        raise DatasetError(
            f"data.stream reads a shard dataset, but {root} is an ImageFolder: write its shards "
            f"with `mimbench data shard {root} --out DIR` and set data.source to DIR, or set "
            "data.stream: false"
        )
    if (root / "imagefolder").is_dir() and not (root / "train").is_dir():
        root = root / "imagefolder"  # the output of `mimbench data synth`
    if not (root / "train").is_dir() and root.name in ("train", "val") and has_images(root, "*/*"):
        raise DatasetError(
            f"{root} looks like one split (class folders of images), not a dataset root: pass "
            f"its parent {root.parent}, which must hold both train/ and val/"
        )
    for split in ("train", "val"):
        check_imagefolder_split(root / split)
    return root


def _layout(root: Path, layout: str) -> str:
    """The layout of ``root``: ``shards`` where a shard manifest is, else ``imagefolder``.

    Raises:
        DatasetError: ``layout`` names the other layout than the one found.
    """
    found = "shards" if is_shard_root(root) else "imagefolder"
    if layout not in ("auto", found):
        fix = ("write its shards with `mimbench data shard`" if layout == "shards"
               else "set data.layout to shards or auto")  # fmt: skip
        raise DatasetError(f"data.layout is '{layout}' but {root} holds {found}: {fix}")
    return found


def resolve_shapes_root(data: DataConfig) -> Path:
    """Root of the synthetic dataset ``data.shapes`` describes (generated into the cache on
    first use): ``imagefolder/``, ``coco/`` and ``ade20k/`` live under it."""

    return ensure_shapes(ShapesSpec(**data.shapes.model_dump()))


def imagefolder_classes(root: Path, split: str, min_classes: int = 2) -> list[str]:
    """The class names of ``root/split``, checked without reading an image: the split's layout,
    at least ``min_classes`` classes, and for a split other than train the train split's classes.

    Raises:
        DatasetError: A wrong layout, too few classes, or classes that differ between splits.
    """
    if is_shard_root(root):  # a shard dataset: the classes of its manifest (one list for all)
        man = read_manifest(root)
        split_manifest(man, root, split)
        classes = list(man["classes"])
    else:
        classes = check_imagefolder_split(root / split)
    if len(classes) < min_classes:
        raise DatasetError(
            f"{root / split} has {len(classes)} class folder(s) ({', '.join(classes)}), this task "
            f"needs at least {min_classes}: with a single class every prediction is right and "
            "accuracy reads 100; add the other class folders (ImageNet-1k's layout: "
            "<split>/<class>/*.jpg, the same classes in train/ and val/)"
        )
    if split != "train" and (root / "train").is_dir() and not is_shard_root(root):
        train_classes = check_imagefolder_split(root / "train")
        if classes != train_classes:
            raise DatasetError(
                f"class folders differ between {root / 'train'} and {root / split}: "
                f"{sorted(set(classes) ^ set(train_classes))[:10]}"
            )
    return classes


def check_classification_data(data: DataConfig) -> Path:
    """Check the ImageFolder a classification task reads (train and val, the same two or more
    classes) without reading an image, so that a wrong path fails before anything runs;
    returns its root.

    Raises:
        DatasetError: The path is missing or its layout is wrong (the message names the fix).
    """
    root = resolve_imagefolder_root(data)
    for split in ("train", "val"):
        imagefolder_classes(root, split)
    return root


def imagefolder_checked(
    root: Path, split: str, transform: Any, strict: bool = False, min_classes: int = 2
) -> CheckedImageFolder:
    """The ImageFolder of ``root/split``, unreadable files skipped (or fatal with ``strict``);
    for a shard dataset, its :class:`~harness.core.data.shards.ShardImageFolder` (the same
    interface and sample order).

    Args:
        root: Dataset root (holding ``train/`` and ``val/``, or a shard manifest).
        split: ``train`` or ``val``; a split other than train must have train's classes.
        transform: Applied to each decoded image.
        strict: Unreadable files raise instead of being skipped.
        min_classes: Fewest class folders accepted: 2 for classification (with one class every
            prediction is right and accuracy reads 100), 1 for pretraining (labels unused).

    Raises:
        DatasetError: A wrong layout, too few classes, or classes that differ between splits
            (:func:`imagefolder_classes`).
    """
    imagefolder_classes(root, split, min_classes)
    if is_shard_root(root):
        return ShardImageFolder(root, split, transform=transform, strict=strict)
    return CheckedImageFolder(str(root / split), transform=transform, strict=strict)


class SkipTally:
    """The unreadable files met while reading one split of a :class:`CheckedImageFolder`.

    A loop gives it the dataset indices of each batch and the ``kept`` mask that
    :func:`collate_skipping` returns; :meth:`report` names the unreadable files on the log (each
    file once, however many epochs meet it) and :meth:`check_readable` fails when not one image
    of the split could be read (instead of an internal error further down).

    Args:
        ds: The checked dataset the indices refer to.
        name: What the log calls the split (e.g. ``train``).
    """

    #: File names listed per log line (the count is always complete).
    SHOW = 5

    def __init__(self, ds: CheckedImageFolder, name: str) -> None:
        self.ds, self.name = ds, name
        self.skipped: set[int] = set()
        self.events = 0  # skips counted every time a file is met (epochs repeat them)
        self.seen = 0
        self.kept = 0
        self._reported: set[int] = set()
        self._any_readable = False

    def add(self, indices: Sequence[int], kept: torch.Tensor) -> None:
        """Record one batch: its dataset ``indices`` and the ``[len(indices)]`` kept mask."""
        flags = kept.tolist()
        if len(flags) != len(indices):
            raise ValueError(f"{len(indices)} indices but a kept mask of {len(flags)}")
        for i, ok in zip(indices, flags, strict=True):
            if not ok:
                self.skipped.add(int(i))
                self.events += 1
        self.seen += len(flags)
        self.kept += int(sum(flags))

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far."""
        return len(self.skipped)

    def paths(self, indices: set[int] | None = None) -> list[str]:
        """Paths (relative to the split folder) of the unreadable files met, sorted."""
        idx = self.skipped if indices is None else indices
        return sorted(os.path.relpath(self.ds.samples[i][0], self.ds.root) for i in idx)

    def report(self, log: Callable[[str], Any]) -> None:
        """Log the unreadable files not reported yet: their count and the first names."""
        new = self.skipped - self._reported
        if not new:
            return
        self._reported |= new
        log(skipped_message(self.name, Path(self.ds.root), self.paths(new), len(self.ds)))

    def check_readable(self) -> None:
        """Raise when every image met so far was unreadable and so is every image of the split.

        Cheap once an image was read; otherwise the split is scanned up to its first readable
        file (so a batch of unreadable files in a split with good ones passes).

        Raises:
            DatasetError: No image of the split decodes.
        """
        if self.kept or not self.seen or self._any_readable:
            return
        for path, _ in self.ds.samples:
            try:
                self.ds.loader(path)
            except (OSError, ValueError, SyntaxError):
                continue
            self._any_readable = True
            return
        raise all_unreadable_error(self.ds)


def skipped_message(name: str, split_dir: Path, paths: Sequence[str], total: int) -> str:
    """The log line naming unreadable files of a split that were skipped."""
    shown = ", ".join(paths[: SkipTally.SHOW]) + (", ..." if len(paths) > SkipTally.SHOW else "")
    return (
        f"[data] {name} ({split_dir}): skipped {len(paths)} unreadable image(s) of {total}: "
        f"{shown} (strict_data / --strict makes them fatal)"
    )


def all_unreadable_error(ds: CheckedImageFolder) -> DatasetError:
    """The error of a split none of whose images decodes."""
    eg = ", ".join(os.path.relpath(p, ds.root) for p, _ in ds.samples[:3])
    return DatasetError(
        f"all {len(ds)} images of {ds.root} are unreadable (e.g. {eg}): PIL decodes none of "
        "them; check that they are image files (not truncated downloads, archives or Git LFS "
        "pointers) and that data.source names the right folder"
    )


def collate_skipping(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(image, label)`` pairs, dropping the ``None`` of unreadable files.

    Returns:
        Images ``[K, C, H, W]``, labels ``[K]`` and a boolean ``[len(batch)]`` marking the
        samples kept (K of them; K may be 0).
    """
    kept = torch.tensor([b is not None for b in batch], dtype=torch.bool)
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), kept
    imgs = stack_images([b[0] for b in good])
    labels = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
    return imgs, labels, kept


def pretrain_transform(
    img_size: int, crop_scale: tuple[float, float], hflip: bool, photometric: Sequence[Any] = ()
) -> Any:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalization (MAE, SimMIM),
    with the ``photometric`` ops (:func:`photometric_ops`) on the PIL crop after the flip."""
    t: list[Any] = [
        transforms.RandomResizedCrop(img_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC)
    ]
    if hflip:
        t.append(transforms.RandomHorizontalFlip())
    t += [*photometric, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(t)


class RandomGaussianBlur:
    """A PIL Gaussian blur (``ImageFilter.GaussianBlur``, PIL's own kernel) with probability
    ``p``, its radius drawn uniformly from ``radius`` (DINO's / iBOT's ``utils.GaussianBlur``:
    radius in [0.1, 2], applied when a uniform draw is at most ``p``). The draws come from
    torch's generator, which :class:`SeededDataset` seeds per sample."""

    def __init__(self, p: float, radius: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.radius = p, radius

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) > self.p:
            return img
        r = float(torch.empty(()).uniform_(*self.radius))
        return img.filter(ImageFilter.GaussianBlur(radius=r))

    def __repr__(self) -> str:
        return f"RandomGaussianBlur(p={self.p}, radius={self.radius})"


class RandomSolarize:
    """``ImageOps.solarize`` (values at or above ``threshold`` inverted) with probability ``p``
    (DINO's / iBOT's ``utils.Solarization``, PIL's default threshold 128); the draw comes from
    torch's generator, which :class:`SeededDataset` seeds per sample."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, self.threshold) if float(torch.rand(())) < self.p else img

    def __repr__(self) -> str:
        return f"RandomSolarize(p={self.p}, threshold={self.threshold})"


#: The crops one augmentation set tells apart: the first global crop, the other global crops,
#: the local crops.
VIEW_KINDS = ("first", "other", "local")

# DINO / iBOT (bytedance/ibot main_ibot.py DataAugmentationiBOT, utils.GaussianBlur /
# Solarization): blur and solarization probabilities of each view kind
_DINO_BLUR_P = {"first": 1.0, "other": 0.1, "local": 0.5}
_DINO_SOLARIZE_P = {"first": 0.0, "other": 0.2, "local": 0.0}


def photometric_ops(augment: str, view: str) -> list[Any]:
    """The photometric transforms of augmentation set ``augment`` (``recipe.augment``) for one
    kind of crop (``view``, one of :data:`VIEW_KINDS`), applied to the PIL crop after the random
    resized crop and flip.

    ``dino``, as bytedance/ibot's ``DataAugmentationiBOT`` (DINO's): colour jitter (brightness
    0.4, contrast 0.4, saturation 0.2, hue 0.1) with probability 0.8, grayscale with 0.2, a
    Gaussian blur of radius in [0.1, 2] with 1.0 on the first global crop, 0.1 on the others and
    0.5 on the local crops, and solarization with 0.2 on the global crops after the first.

    Raises:
        ValueError: An unknown set or view kind.
    """
    if view not in VIEW_KINDS:
        raise ValueError(f"view '{view}' is not a kind of crop: use one of {', '.join(VIEW_KINDS)}")
    if augment == "none":
        return []
    if augment != "dino":
        raise ValueError(f"augment '{augment}' is not an augmentation set: use one of {', '.join(AUGMENTS)}")
    ops: list[Any] = [
        transforms.RandomApply(
            [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
        ),
        transforms.RandomGrayscale(p=0.2),
        RandomGaussianBlur(_DINO_BLUR_P[view]),
    ]
    if _DINO_SOLARIZE_P[view] > 0:
        ops.append(RandomSolarize(_DINO_SOLARIZE_P[view]))
    return ops


class MultiView:
    """``views`` independent draws of ``transform`` stacked, ``[V, C, H, W]`` per image: the
    global crops of DINO / iBOT (batched by :func:`collate_skipping` as ``[B, V, C, H, W]``).
    One view is the transform's own output, ``[C, H, W]``. With ``rest``, the views after the
    first are drawn from it instead (DINO / iBOT: the first global crop always blurred, the
    others rarely, and solarized). With ``local_views`` draws of ``local`` as well (the smaller
    local crops of iBOT's multi-crop, ``DataAugmentationiBOT``: the global crops first, then
    the local ones), each image is :class:`Crops`."""

    def __init__(
        self, transform: Any, views: int, local: Any = None, local_views: int = 0, rest: Any = None
    ) -> None:
        if local_views and local is None:
            raise ValueError(f"{local_views} local views need their transform (local=...)")
        self.transform = transform
        self.views = views
        self.local = local
        self.local_views = local_views
        self.rest = transform if rest is None else rest

    def __call__(self, img: Any) -> torch.Tensor | Crops:
        views = torch.stack([self.transform(img)] + [self.rest(img) for _ in range(self.views - 1)])
        if self.local_views:
            return Crops(views, torch.stack([self.local(img) for _ in range(self.local_views)]))
        return views[0] if self.views == 1 else views


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Any:
    """Resize the short side to ``img_size / crop_pct`` (bicubic), center crop, normalize."""
    resize = int(round(img_size / crop_pct))
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class SeededDataset(Dataset):
    """Wraps a dataset so each sample's augmentation is seeded by (seed, epoch, index).

    Args:
        base: A dataset whose ``__getitem__`` draws from torch's global RNG.
        seed: Run seed.
    """

    #: The per-sample seed is taken modulo this.
    MODULUS = 2**63 - 1

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def sample_seed(self, index: int, epoch: int | None = None) -> int:
        """The seed of sample ``index`` in ``epoch`` (None: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        return (self.seed * 1_000_003 + epoch * 100_003 + index) % self.MODULUS

    def keyed(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(seed, index) of ``key``: a sample index (in the current epoch) or ``(epoch, index)``.

        The second form carries the epoch with the sample: a persistent loader worker holds a
        copy of this dataset made when it started, whose ``epoch`` :meth:`set_epoch` no longer
        reaches."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        return self.sample_seed(index, epoch), index

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        seed, index = self.keyed(key)
        with torch.random.fork_rng(devices=[]):
            seed_cpu_rng(seed)
            return self.base[index]


class FullySeededDataset(SeededDataset):
    """A :class:`SeededDataset` that also seeds Python's ``random`` and numpy around each sample
    (restoring them after), so timm's augmentations (RandAugment, random erasing, crops) are
    reproducible under resume and independent of the number of loader workers. Seeds are taken
    modulo ``2**32 - 1``, numpy's range."""

    MODULUS = 2**32 - 1

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        s, index = self.keyed(key)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_cpu_rng(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.base[index]
            finally:
                random.setstate(py)
                np.random.set_state(npy)
