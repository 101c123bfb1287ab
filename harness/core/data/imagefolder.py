"""The ImageFolder layout's checks and its reader that survives unreadable files: the bottom of
:mod:`harness.core.data` (the datasets module and the shard readers build on it).

A transform that decodes the image itself (:class:`LazyDecode`, e.g. the draft-mode crop of
:mod:`harness.core.data.fastdecode`) is given the image opened but not decoded; any other
transform gets it decoded to RGB, as from torchvision's loader.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from PIL import Image
from torchvision import datasets

from harness.core.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(UserError, ValueError):
    """A dataset path or layout is wrong; the message says what to fix."""


def has_images(folder: Path, pattern: str) -> bool:
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
        flat = has_images(split_dir, "*")
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
    empty = [c for c in classes if not has_images(split_dir / c, "**/*")]
    if empty:
        raise DatasetError(
            f"{split_dir}: class folder(s) without images: {', '.join(empty[:10])}; "
            "remove them or add images"
        )
    return classes


def unreadable_image_error(path: str | Path, reason: str) -> DatasetError:
    """The error of a strict run on an image file PIL cannot decode (``reason`` says why)."""
    return DatasetError(
        f"unreadable image {path} ({reason}); remove or replace it, or run without --strict "
        "(strict_data: false) to skip unreadable files (they are counted in the record)"
    )


def seed_cpu_rng(seed: int) -> None:
    """Seed torch's CPU generator only (what the CPU transforms draw from), the same state as
    ``torch.manual_seed(seed)`` gives it. ``torch.manual_seed`` also seeds every accelerator
    backend, which on a CUDA build without an initialised device queues a lazy call holding a
    formatted stack trace: about 2 ms per sample (measured), more than a crop's resize; and with
    a device it reseeds the device's generator outside ``fork_rng(devices=[])``."""
    torch.default_generator.manual_seed(seed)


class LazyDecode:
    """A transform that takes a PIL image opened but not decoded (``Image.open`` only) and
    decodes it itself (e.g. at reduced size with ``draft``); a reader calls it inside its
    unreadable-file handling, since decoding errors surface there."""

    def __call__(self, img: Image.Image) -> Any:
        raise NotImplementedError


def decode_sample(fp: str | Path | IO[bytes], transform: Any) -> Any:
    """The image at ``fp`` through ``transform``: opened lazily for a :class:`LazyDecode`,
    decoded to RGB first for any other transform (None: the RGB image itself).

    Raises:
        OSError: The file does not decode (PIL's errors are OSErrors, ValueErrors or
            SyntaxErrors).
    """
    img = Image.open(fp)
    if isinstance(transform, LazyDecode):
        return transform(img)
    rgb = img.convert("RGB")
    return rgb if transform is None else transform(rgb)


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder that survives unreadable image files.

    A file PIL cannot decode (corrupt, truncated, not an image) makes ``__getitem__`` return
    ``None`` (batch with :func:`collate_skipping`, which drops it and says which ones it kept;
    count and name them with :class:`SkipTally`), or, with ``strict``, raise
    :class:`DatasetError` naming the file.
    """

    def __init__(self, root: str, transform: Any = None, strict: bool = False) -> None:
        super().__init__(root, transform=transform)
        self.strict = strict

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        lazy = isinstance(self.transform, LazyDecode)
        try:  # a LazyDecode transform decodes the image: its errors are the file's
            sample = self.transform(self.open(path)) if lazy else self.loader(path)
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
            if self.strict:
                raise unreadable_image_error(path, f"{type(exc).__name__}: {exc}") from None
            return None
        if self.transform is not None and not lazy:
            sample = self.transform(sample)
        return sample, target

    def open(self, path: str) -> Image.Image:
        """The image at ``path`` opened, not decoded (what a :class:`LazyDecode` transform gets):
        the file read in one call, then parsed from memory (PIL's header parse from the file
        makes dozens of small reads; on the fast path they cost about a sixth of the time)."""
        with open(path, "rb") as f:
            return Image.open(io.BytesIO(f.read()))

    def sample_stat(self, path: str) -> tuple[int, int]:
        """(size in bytes, modification time in ns) standing for the contents of sample ``path``
        in cache fingerprints (one ``stat``, no image read)."""
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns


class Crops(NamedTuple):
    """The multi-crop views of one image (``[G, C, H, W]`` global, ``[L, C, h, w]`` local) or
    of a batch (``[B, G, C, H, W]``, ``[B, L, C, h, w]``: :func:`stack_images`)."""

    views: torch.Tensor
    local: torch.Tensor


def stack_images(images: Sequence[Any]) -> Any:
    """A batch of samples' images: the tensors stacked, ``[B, ...]``, or :class:`Crops`
    stacked field by field."""
    if isinstance(images[0], Crops):
        return Crops(*(torch.stack(part) for part in zip(*images, strict=True)))
    return torch.stack(list(images))
