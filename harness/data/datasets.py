"""Image datasets and transforms: ImageFolder roots (ImageNet-1k's layout, or the embedded
synthetic "shapes" generated on demand), with a clear message for a wrong layout.

Augmentation randomness is seeded per (seed, epoch, sample index) inside
:class:`SeededDataset`, so a batch's content depends on neither the number of loader workers nor
on whether the run was interrupted and resumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from harness.config import DataConfig
from harness.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(UserError, ValueError):
    """A dataset path or layout is wrong; the message says what to fix."""


def resolve_imagefolder_root(data: DataConfig) -> Path:
    """The ImageFolder root (holding ``train/`` and ``val/``) that ``data`` names.

    ``source: shapes`` generates (or reuses from the cache) the synthetic dataset.
    """
    if data.source == "shapes":
        return resolve_shapes_root(data) / "imagefolder"
    root = Path(data.source).expanduser()
    if not root.exists():
        raise DatasetError(
            f"dataset path {root} does not exist: set data.source to an ImageFolder root holding "
            "train/<class>/*.jpg and val/<class>/*.jpg (ImageNet-1k's layout), or to 'shapes'"
        )
    if (root / "imagefolder").is_dir() and not (root / "train").is_dir():
        root = root / "imagefolder"  # the output of `mimbench data synth`
    if not (root / "train").is_dir() and root.name in ("train", "val") and _has_images(root, "*/*"):
        raise DatasetError(
            f"{root} looks like one split (class folders of images), not a dataset root: pass "
            f"its parent {root.parent}, which must hold both train/ and val/"
        )
    for split in ("train", "val"):
        check_imagefolder_split(root / split)
    return root


def resolve_shapes_root(data: DataConfig) -> Path:
    """Root of the synthetic dataset ``data.shapes`` describes (generated into the cache on
    first use): ``imagefolder/``, ``coco/`` and ``ade20k/`` live under it."""
    from harness.data.shapes import ShapesSpec, ensure_shapes

    return ensure_shapes(ShapesSpec(**data.shapes.model_dump()))


def _has_images(folder: Path, pattern: str) -> bool:
    """Whether a path of ``folder.glob(pattern)`` is an image file (stops at the first one)."""
    return any(f.suffix.lower() in IMG_EXTENSIONS and f.is_file() for f in folder.glob(pattern))


def check_imagefolder_split(split_dir: Path) -> list[str]:
    """Check one split's layout; return its class names (sorted)."""
    if not split_dir.is_dir():
        raise DatasetError(
            f"{split_dir} is missing: an ImageFolder root needs train/ and val/ folders, "
            "each with one sub-folder per class"
        )
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        flat = _has_images(split_dir, "*")
        raise DatasetError(
            f"{split_dir} has no class folders: put images in {split_dir}/<class>/"
            + (
                " (it holds images directly; ImageNet-1k's val archive unpacks flat: sort it into "
                "the 1000 wnid folders of train/ first, e.g. with the LOC_val_solution.csv labels)"
                if flat
                else ""
            )
        )
    # torchvision's ImageFolder walks each class folder recursively: so does this check
    empty = [c for c in classes if not _has_images(split_dir / c, "**/*")]
    if empty:
        raise DatasetError(
            f"{split_dir}: class folder(s) without images: {', '.join(empty[:10])}; "
            "remove them or add images"
        )
    return classes


def imagefolder(root: Path, split: str, transform: Any) -> datasets.ImageFolder:
    """torchvision ImageFolder over ``root/split`` (classes must agree between splits)."""
    ds = datasets.ImageFolder(str(root / split), transform=transform)
    if split != "train" and (root / "train").is_dir():
        train_classes = check_imagefolder_split(root / "train")
        if ds.classes != train_classes:
            raise DatasetError(
                f"class folders differ between {root / 'train'} and {root / split}: "
                f"{sorted(set(ds.classes) ^ set(train_classes))[:10]}"
            )
    return ds


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder that survives unreadable image files.

    A file PIL cannot decode (corrupt, truncated, not an image) makes ``__getitem__`` return
    ``None`` (batch with :func:`collate_skipping`, which drops it and says which ones it kept),
    or, with ``strict``, raise :class:`DatasetError` naming the file.
    """

    def __init__(self, root: str, transform: Any = None, strict: bool = False) -> None:
        super().__init__(root, transform=transform)
        self.strict = strict

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
            if self.strict:
                raise DatasetError(
                    f"unreadable image {path} ({type(exc).__name__}: {exc}); remove or replace it, "
                    "or run without --strict to skip unreadable files (they are counted in the record)"
                ) from None
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, target


def imagefolder_checked(root: Path, split: str, transform: Any, strict: bool = False) -> CheckedImageFolder:
    """Like :func:`imagefolder`, with unreadable files skipped (or fatal with ``strict``)."""
    check_imagefolder_split(root / split)
    ds = CheckedImageFolder(str(root / split), transform=transform, strict=strict)
    if split != "train" and (root / "train").is_dir():
        train_classes = check_imagefolder_split(root / "train")
        if ds.classes != train_classes:
            raise DatasetError(
                f"class folders differ between {root / 'train'} and {root / split}: "
                f"{sorted(set(ds.classes) ^ set(train_classes))[:10]}"
            )
    return ds


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
    imgs = torch.stack([b[0] for b in good])
    labels = torch.tensor([int(b[1]) for b in good], dtype=torch.long)
    return imgs, labels, kept


def pretrain_transform(img_size: int, crop_scale: tuple[float, float], hflip: bool) -> Any:
    """RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalization (MAE, SimMIM)."""
    t: list[Any] = [
        transforms.RandomResizedCrop(img_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC)
    ]
    if hflip:
        t.append(transforms.RandomHorizontalFlip())
    t += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(t)


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

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        s = (self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.base[index]


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalization: ``[B, 3, H, W]`` to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)
