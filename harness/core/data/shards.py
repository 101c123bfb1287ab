"""Sharded datasets: WebDataset-style tar shards written from an ImageFolder, read either by
random access (:class:`ShardImageFolder`, a drop-in for the ImageFolder every task and
pretraining read) or as a stream (:class:`ShardStream`, an ``IterableDataset``).

Layout (WebDataset's convention, readable by the ``webdataset`` library: ``wds.WebDataset(
"DIR/train/train-{000000..000009}.tar").decode("pil").to_tuple("jpg", "cls")``, where ``jpg``
stands for the image's own extension)::

    DIR/manifest.json                  # written last: a directory without it is not a dataset
    DIR/train/train-000000.tar         # members KEY.jpg (the file's bytes, not re-encoded) and
    DIR/train/train-000000.idx.json    # KEY.cls (the class index in ASCII), grouped by key;
    DIR/train/train-000001.tar         # beside each shard its index (the members' keys,
    DIR/train/train-000001.idx.json    # labels, offsets, sizes)
    DIR/val/val-000000.tar
    DIR/val/val-000000.idx.json

A key is the image's path in its split without the extension, dots made underscores
(``n01440764/n01440764_10026``); WebDataset groups a sample's members by the part of the name
before the first dot of its base name. Samples are shuffled (seeded) across shards when written,
so a stream's shuffle buffer mixes classes.

The manifest (``format: mimbench-shards``) holds the classes and, per split and shard, its sample
count, byte size and sha256, and its index file's name and sha256. A shard's index lists each
member's key, extension, label, data offset and size. The random access reader reads every
index and seeks by those offsets (after checking the tar header in front of the data names the
same member), and orders its samples as torchvision's ImageFolder does (class, then path), so
index ``i`` is the same image in both layouts and a run reads the same batches from either. The
stream reads a shard's index when it reads the shard, so a process holds the manifest's
shard-level entries only.

Why per-shard indexes (version 2): version 1 listed every member in the manifest; for
ImageNet-1k's 1.28M train images that is a 77 MB JSON file: building a stream took 2 s and
held about 450 MB of Python objects in every rank (and, as loader workers touch them, in every
worker); with version 2 the manifest is 0.3 MB, the stream holds 3 MB and reads a shard's index
in 0.4 ms (``scripts/manifest_scale.py``). Version 1 datasets are still read.

Bad input (every case skipped and counted, or fatal with ``strict``, naming shard and member):
a missing shard or one whose size differs from the manifest (all of its samples unreadable), a
truncated or corrupt member, a member the index names but the tar does not hold at that place,
an image that does not decode, a shard whose sha256 differs (the stream checks it as it reads
the shard through), a missing or damaged index (the stream: the shard's samples unreadable;
the random access reader cannot list the samples without it and stops, naming it).

Written atomically: each shard goes to a temporary name and is renamed when complete, the
manifest last; an interrupted ``mimbench data shard`` leaves no shard that looks complete and no
manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.datasets.vision import VisionDataset

from harness.core.data.imagefolder import (
    IMG_EXTENSIONS,
    CheckedImageFolder,
    DatasetError,
    check_imagefolder_split,
    decode_sample,
    seed_cpu_rng,
    stack_images,
)
from harness.core.fsutil import atomic_write_bytes, atomic_write_json, canonical_json

MANIFEST = "manifest.json"
FORMAT = "mimbench-shards"
VERSION = 2
#: Manifest versions this code reads (1: the members listed in the manifest itself).
READABLE_VERSIONS = (1, 2)
INDEX_SUFFIX = ".idx.json"
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- manifest


def is_shard_root(root: Path) -> bool:
    """Whether ``root`` holds a shard manifest (``mimbench data shard``'s output).

    A ``manifest.json`` that another generator wrote (the synthetic dataset's names its
    ``generator``) is not one; an unreadable one is taken for one, so that reading it says what
    is wrong with it (:func:`read_manifest`)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(man, dict) and "generator" in man and man.get("format") != FORMAT)


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the shard dataset at ``root``.

    Raises:
        DatasetError: It is missing, not JSON, or not a mimbench shard manifest.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing: {root} is not a shard dataset; write one with "
            "`mimbench data shard IMAGEFOLDER --out DIR` (an interrupted write leaves no manifest: "
            "run it again)"
        )
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}): write the shards again") from None
    if man.get("format") != FORMAT or man.get("version") not in READABLE_VERSIONS:
        raise DatasetError(
            f"{path} is not a {FORMAT} manifest of version {READABLE_VERSIONS} (format "
            f"{man.get('format')!r}, version {man.get('version')!r}): write the shards again with "
            "`mimbench data shard`"
        )
    return man


def split_manifest(man: dict[str, Any], root: Path, split: str) -> dict[str, Any]:
    """One split's entry of the manifest.

    Raises:
        DatasetError: The manifest has no such split.
    """
    if split not in man["splits"]:
        raise DatasetError(
            f"{Path(root) / MANIFEST} has no '{split}' split (it has "
            f"{', '.join(man['splits']) or 'none'}): shard an ImageFolder root holding train/ and val/"
        )
    return man["splits"][split]


def shard_members(split_dir: Path, entry: dict[str, Any]) -> list[list[Any]]:
    """The members ``[key, ext, label, offset, size]`` of one shard, in the tar's order: from its
    index file (version 2; checked against the manifest's sha256 and sample count) or from the
    manifest entry itself (version 1).

    Raises:
        OSError: The index is missing, or does not match the manifest (the message names it).
    """
    if "members" in entry:
        return list(entry["members"])
    path = Path(split_dir) / entry["index"]
    raw = path.read_bytes()  # FileNotFoundError: an OSError naming the path
    if hashlib.sha256(raw).hexdigest() != entry["index_sha256"]:
        raise OSError(f"index {path} does not match the manifest's sha256 (damaged or rewritten)")
    try:
        members = json.loads(raw)["members"]
    except (ValueError, KeyError, TypeError) as exc:
        raise OSError(f"index {path} is not a shard index ({exc})") from None
    if len(members) != entry["samples"]:
        raise OSError(f"index {path} lists {len(members)} members, the manifest {entry['samples']}")
    return list(members)


# --------------------------------------------------------------------------- writing


def sample_key(rel: str) -> str:
    """The WebDataset key of an image at ``rel`` (its path in the split): the path without its
    extension, dots made underscores (WebDataset cuts a name at the first dot of its base name)."""
    stem = os.path.splitext(rel)[0].replace(os.sep, "/")
    return stem.replace(".", "_")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add member ``name`` holding ``data``; returns the offset of its data in the file."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    # the file's end is now the data padded to whole 512-byte blocks
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _write_shard(path: Path, samples: Sequence[tuple[str, str, int, Path]]) -> dict[str, Any]:
    """Write one shard and then its index, each atomically (a temporary name, renamed when
    complete); returns its manifest entry. ``samples``: (key, extension, label, source file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    members = []
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, ext, label, src in samples:
                    data = src.read_bytes()
                    off = _tar_add(tar, f"{key}.{ext}", data)
                    _tar_add(tar, f"{key}.cls", str(label).encode())
                    members.append([key, ext, label, off, len(data)])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {
        "name": path.name,
        "samples": len(members),
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
        **write_index(path, members),
    }


def write_index(shard: Path, members: list[list[Any]]) -> dict[str, str]:
    """Write the index of ``shard`` (its ``members``, ``[key, ext, label, offset, size]`` in the
    tar's order) beside it, atomically; returns the manifest entry's ``index`` and
    ``index_sha256``."""
    index = shard.name.removesuffix(".tar") + INDEX_SUFFIX
    raw = (canonical_json({"shard": shard.name, "members": members}) + "\n").encode()
    atomic_write_bytes(shard.with_name(index), raw)
    return {"index": index, "index_sha256": hashlib.sha256(raw).hexdigest()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_samples(split_dir: Path, classes: list[str]) -> list[tuple[str, str, int, Path]]:
    """(key, extension, label, file) of every image of one ImageFolder split, ImageFolder's order."""
    out: list[tuple[str, str, int, Path]] = []
    seen: set[str] = set()
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(split_dir / cls, followlinks=True)):
            for fname in sorted(files):
                ext = os.path.splitext(fname)[1].lower()
                if ext not in IMG_EXTENSIONS:
                    continue
                path = Path(dirpath) / fname
                key = sample_key(os.path.relpath(path, split_dir))
                if key in seen:
                    raise DatasetError(
                        f"{path}: two images of {split_dir} map to the key {key!r} (the same "
                        "name up to dots and extension); rename one of them"
                    )
                seen.add(key)
                out.append((key, ext.lstrip("."), label, path))
    return out


def write_shards(
    src: Path,
    out: Path,
    shard_size: int = 1000,
    seed: int = 0,
    log: Callable[[str], Any] = print,
) -> Path:
    """Shard the ImageFolder root ``src`` (``train/`` and ``val/``) into ``out``.

    Args:
        src: ImageFolder root.
        out: New or empty directory (or an earlier output, which is replaced).
        shard_size: Samples per shard (the last one of a split may hold fewer).
        seed: Seed of the order in which samples are spread over the shards.
        log: Where progress lines go.

    Returns:
        The manifest's path.

    Raises:
        DatasetError: A wrong source layout, or ``out`` holds other files.
    """
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1, got {shard_size}")
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()) and not is_shard_root(out):
        raise DatasetError(f"{out} exists and is not a shard dataset: give a new or empty directory")
    classes = check_imagefolder_split(src / "train")
    if check_imagefolder_split(src / "val") != classes:
        raise DatasetError(f"class folders differ between {src / 'train'} and {src / 'val'}")
    (out / MANIFEST).unlink(missing_ok=True)  # the old output stops looking complete first
    man: dict[str, Any] = {"format": FORMAT, "version": VERSION, "classes": classes,
                           "shard_size": shard_size, "seed": seed, "splits": {}}  # fmt: skip
    for split in SPLITS:
        samples = _split_samples(src / split, classes)
        random.Random(seed * 1_000_003 + SPLITS.index(split)).shuffle(samples)
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in [*(out / split).glob(f"{split}-*.tar"), *(out / split).glob(f"{split}-*{INDEX_SUFFIX}")]:
            old.unlink()
        shards = []
        for i in range(0, len(samples), shard_size):
            name = f"{split}-{i // shard_size:06d}.tar"
            shards.append(_write_shard(out / split / name, samples[i : i + shard_size]))
        man["splits"][split] = {"samples": len(samples), "shards": shards}
        log(f"[data shard] {split}: {len(samples)} images in {len(shards)} shard(s)")
    return atomic_write_json(out / MANIFEST, man)


# --------------------------------------------------------------------------- random access


@dataclass(frozen=True, slots=True)
class _Member:
    shard: int
    key: str
    ext: str
    offset: int
    size: int


def _tar_name(header: bytes) -> str:
    """The member name in a 512-byte ustar header (prefix + name)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


class ShardImageFolder(CheckedImageFolder):
    """One split of a shard dataset, read by random access, with the interface of
    :class:`~harness.core.data.datasets.CheckedImageFolder` (``samples``, ``classes``, ``root``,
    ``loader``, ``strict``; ``None`` for an unreadable sample), so every task and pretraining
    read it unchanged.

    A sample's "path" is ``ROOT/SPLIT/SHARD.tar/KEY.EXT``: logs and records name shard and member.
    A shard that is missing or whose size differs from the manifest makes each of its samples
    unreadable (or is fatal with ``strict``, raised here).

    Args:
        root: Shard dataset root (holding ``manifest.json``).
        split: ``train`` or ``val``.
        transform: Applied to each decoded image.
        strict: Unreadable samples raise instead of being skipped.
    """

    def __init__(self, root: Path, split: str, transform: Any = None, strict: bool = False) -> None:
        man = read_manifest(root)
        VisionDataset.__init__(self, str(Path(root) / split), transform=transform)
        self.strict = strict
        self.classes = list(man["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.shard_paths: list[Path] = []
        self.bad_shards: dict[int, str] = {}
        members: list[tuple[int, str, _Member]] = []
        for s, entry in enumerate(split_manifest(man, root, split)["shards"]):
            path = Path(self.root) / entry["name"]
            self.shard_paths.append(path)
            problem = _shard_problem(path, entry)
            if problem:
                if strict:
                    raise DatasetError(f"{problem}; {_SHARD_FIX}")
                self.bad_shards[s] = problem
            try:
                listed = shard_members(Path(self.root), entry)
            except OSError as exc:  # without its index the shard's samples cannot be listed
                raise DatasetError(
                    f"cannot list the samples of shard {path}: {exc}; write the shards again "
                    "with `mimbench data shard`"
                ) from None
            for key, ext, label, off, size in listed:
                members.append((int(label), key, _Member(s, key, ext, int(off), int(size))))
        members.sort(key=lambda m: (m[0], m[1]))  # ImageFolder's order: class, then path
        self._members = {self._path(m): m for _, _, m in members}
        self.samples = [(self._path(m), label) for label, _, m in members]
        self.targets = [label for _, label in self.samples]
        self.imgs = self.samples
        self.loader = self.load

    def _path(self, m: _Member) -> str:
        return os.path.join(self.root, self.shard_paths[m.shard].name, f"{m.key}.{m.ext}")

    def read_bytes(self, path: str) -> bytes:
        """The bytes of the member at ``path`` (a sample path of this dataset).

        Raises:
            OSError: The shard is missing or damaged, or the tar header in front of the data
                does not name this member (the manifest does not match the shard).
        """
        m = self._members[path]
        if m.shard in self.bad_shards:
            raise OSError(self.bad_shards[m.shard])
        with open(self.shard_paths[m.shard], "rb") as f:
            f.seek(m.offset - 512)
            header = f.read(512)
            data = f.read(m.size)
        name = _tar_name(header)
        if name != f"{m.key}.{m.ext}":
            raise OSError(f"the manifest does not match the shard: {name!r} at its offset")
        if len(data) != m.size:
            raise OSError(f"truncated: {len(data)} of {m.size} bytes")
        return data

    def open(self, path: str) -> Image.Image:
        """The image at ``path`` opened, not decoded (what a ``LazyDecode`` transform gets)."""
        return Image.open(io.BytesIO(self.read_bytes(path)))

    def load(self, path: str) -> Image.Image:
        """The image at ``path`` decoded to RGB (torchvision's loader, for a shard member)."""
        return self.open(path).convert("RGB")

    def sample_stat(self, path: str) -> tuple[int, int]:
        """(member size, its shard's modification time in ns): a rewritten shard changes it."""
        m = self._members[path]
        return m.size, self.shard_paths[m.shard].stat().st_mtime_ns


_SHARD_FIX = (
    "write the shards again with `mimbench data shard`, or run without strict_data to skip the "
    "samples of a damaged shard (they are counted)"
)


def _shard_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Why shard ``path`` cannot be read as the manifest describes it (None: it can)."""
    if not path.is_file():
        return f"shard {path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (f"shard {path} has {size} bytes, the manifest says {entry['bytes']} (truncated "
                "or rewritten)")  # fmt: skip
    return None


# --------------------------------------------------------------------------- streaming


@dataclass
class StreamItem:
    """One sample of a :class:`ShardStream`: the transformed image (None: unreadable), its
    label, its name ``SHARD.tar/KEY.EXT`` and, when unreadable, why."""

    image: Any
    label: int
    name: str
    error: str | None = None


def collate_stream(
    batch: list[StreamItem],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Collate stream items: images ``[K, ...]`` and labels ``[K]`` of the readable ones, the
    kept mask ``[len(batch)]``, every item's name, and ``"name: why"`` of the unreadable ones."""
    kept = torch.tensor([it.image is not None for it in batch], dtype=torch.bool)
    good = [it for it in batch if it.image is not None]
    imgs = stack_images([it.image for it in good]) if good else torch.empty(0)
    labels = torch.tensor([it.label for it in good], dtype=torch.long)
    bad = [f"{it.name}: {it.error}" for it in batch if it.image is None]
    return imgs, labels, kept, [it.name for it in batch], bad


class ShardResumeError(DatasetError):
    """A stream position cannot be continued exactly with this number of ranks or workers."""


class ShardStream(IterableDataset):
    """One split of a shard dataset as a stream: seeded shard order, shards split per rank and
    per loader worker, a seeded shuffle buffer, exact resume mid-epoch.

    The order is a function of (seed, epoch, ranks, workers): each epoch the shards are permuted
    (seeded), rank ``r`` of ``R`` takes ``[r::R]`` of them and worker slot ``s`` of ``W`` takes
    ``[s::W]`` of the rank's; each slot streams its shards through a shuffle buffer of
    ``buffer`` samples (seeded by seed, epoch, rank, slot) and yields exactly
    :meth:`slot_samples` items, the same number in every slot and epoch (whole batches of the
    fewest a slot can get: a few samples per epoch are left out, like a dropped last batch), so the
    DataLoader's round-robin over workers is a fixed interleaving: batch ``j`` of an epoch is
    batch ``j // W`` of slot ``j % W``.

    Resume: :meth:`set_position` (epoch, batches already taken); worker ``w`` then plays slot
    ``(b + w) % W`` and skips the samples of its batches already taken, without decoding them, so
    the batches after resume are the uninterrupted run's. The position lives in shared memory,
    so persistent workers see it when the next epoch's iterator starts. A position saved with
    another number of ranks or workers cannot be continued exactly: :meth:`load_state_dict`
    raises :class:`ShardResumeError` (start the epoch over, or keep the numbers).

    Unreadable samples (a damaged or missing shard, a member the manifest names but the shard
    does not hold there, an image that does not decode) are yielded as items without an image,
    named, so every slot keeps its length; with ``strict`` they raise :class:`DatasetError`.

    Args:
        root: Shard dataset root.
        split: ``train`` or ``val``.
        transform: Applied to each decoded image (a
            :class:`~harness.core.data.fastdecode.LazyDecode` gets the image undecoded).
        seed: Run seed.
        batch_size: Samples per batch of one rank (the DataLoader's ``batch_size``).
        num_workers: The DataLoader's workers (0 and 1 are the same single stream).
        rank: This process's rank.
        world: Number of ranks.
        buffer: Shuffle buffer size in samples (0: shard order, no shuffling).
        strict: Unreadable samples raise instead of being yielded without an image.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        transform: Any,
        seed: int,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world: int = 1,
        buffer: int = 1000,
        strict: bool = False,
    ) -> None:
        self.root, self.split = Path(root), split
        man = read_manifest(self.root)
        self.entries = split_manifest(man, self.root, split)["shards"]
        self.classes = list(man["classes"])
        self.transform, self.seed, self.batch_size = transform, seed, batch_size
        self.workers, self.rank, self.world = max(1, num_workers), rank, world
        self.buffer, self.strict = buffer, strict
        if len(self.entries) < self.world * self.workers:
            raise DatasetError(
                f"{self.root / split} has {len(self.entries)} shard(s), fewer than ranks x loader "
                f"workers ({self.world} x {self.workers}): every worker needs a shard; write "
                "smaller shards (`mimbench data shard --shard-size`) or use fewer workers"
            )
        self._pos = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, batches taken]

    # ---- order

    def shard_order(self, epoch: int) -> list[int]:
        """The shards of every rank in ``epoch`` (a seeded permutation)."""
        g = torch.Generator().manual_seed((self.seed * 7_919 + epoch) % (2**63 - 1))
        return torch.randperm(len(self.entries), generator=g).tolist()

    def slot_shards(self, epoch: int, rank: int, slot: int) -> list[int]:
        """The shards worker slot ``slot`` of rank ``rank`` streams in ``epoch``."""
        return self.shard_order(epoch)[rank :: self.world][slot :: self.workers]

    def slot_samples(self) -> int:
        """Samples every slot yields in every epoch: whole batches of the fewest samples a slot
        can get. A slot's number of shards is fixed by the positions it takes (only which
        shards varies with the epoch), so the fewest is the sum of that many smallest shards,
        for the slot with the fewest shards; a fixed epoch length keeps the steps of an epoch
        (and the lr schedule's epochs) the same in every epoch."""
        n = len(self.entries)
        count = min(len(range(n)[r :: self.world][w :: self.workers])
                    for r in range(self.world) for w in range(self.workers))  # fmt: skip
        fewest = sum(sorted(e["samples"] for e in self.entries)[:count])
        return fewest // self.batch_size * self.batch_size

    def batches_per_epoch(self) -> int:
        """Batches this rank's loader yields in every epoch (the same on every rank)."""
        return self.slot_samples() // self.batch_size * self.workers

    # ---- position

    def set_position(self, epoch: int, batches_taken: int = 0) -> None:
        """Where the next iterator starts: ``epoch``, after its first ``batches_taken`` batches."""
        if not 0 <= batches_taken <= self.batches_per_epoch():
            raise ValueError(f"batch {batches_taken} is outside epoch {epoch}")
        self._pos[0], self._pos[1] = epoch, batches_taken

    def state_dict(self, epoch: int, batches_taken: int) -> dict[str, int]:
        """What a checkpoint keeps to continue after ``batches_taken`` batches of ``epoch``."""
        return {"epoch": epoch, "batches": batches_taken, "world": self.world,
                "workers": self.workers, "seed": self.seed, "shards": len(self.entries)}  # fmt: skip

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`.

        Raises:
            ShardResumeError: It was saved with another number of ranks, workers or shards, or
                another seed: the order cannot be continued exactly.
        """
        mine = self.state_dict(0, 0)
        diff = [k for k in ("world", "workers", "seed", "shards") if state.get(k) != mine[k]]
        if diff:
            what = ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in diff)
            raise ShardResumeError(
                f"cannot continue the shard stream of {self.root / self.split} exactly ({what}): "
                "its order depends on the number of ranks and loader workers; resume with "
                f"{state.get('world')} rank(s) and {state.get('workers')} worker(s) "
                "(data.num_workers), or restart the epoch"
            )
        self.set_position(int(state["epoch"]), int(state["batches"]))

    # ---- iteration

    def __iter__(self) -> Iterator[StreamItem]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != self.workers:
            raise DatasetError(
                f"this ShardStream was built for {self.workers} loader worker(s), the DataLoader "
                f"has {1 if info is None else info.num_workers}: give both the same num_workers"
            )
        epoch, taken = int(self._pos[0]), int(self._pos[1])
        slot = (taken + w) % self.workers
        skip = (taken + w) // self.workers * self.batch_size
        n = self.slot_samples()
        records = self._shuffled(self._records(epoch, slot), epoch, slot)
        for i, rec in enumerate(records):
            if i >= n:
                return
            if i < skip:
                continue  # taken before the resume: not decoded
            yield self._decode(rec, epoch, slot, i)

    def _records(self, epoch: int, slot: int) -> Iterator[tuple[str, int, bytes | None, str | None]]:
        """(name, label, bytes or None, error) of each member the slot's shards should hold,
        in shard order, as their indexes list them."""
        for s in self.slot_shards(epoch, self.rank, slot):
            yield from self._shard_records(self.entries[s])

    def _shard_records(self, entry: dict[str, Any]) -> Iterator[tuple[str, int, bytes | None, str | None]]:
        path = self.root / self.split / entry["name"]
        try:
            expected = shard_members(self.root / self.split, entry)
        except OSError as exc:  # the members are unknown: the shard's count of unreadable items
            for i in range(entry["samples"]):
                yield f"{entry['name']}/#{i}", -1, None, str(exc)
            return
        problem = _shard_problem(path, entry)
        got: dict[str, bytes] = {}
        if problem is None:
            got, problem = self._read_tar(path, entry)
        for key, ext, label, _, size in expected:
            name = f"{entry['name']}/{key}.{ext}"
            data = got.get(f"{key}.{ext}")
            if data is None or len(data) != size:
                why = problem or "its index names it, the shard does not hold it"
                yield name, int(label), None, why
            else:
                yield name, int(label), data, None

    def _read_tar(self, path: Path, entry: dict[str, Any]) -> tuple[dict[str, bytes], str | None]:
        """The shard's image members by name, and what is wrong with it (None: nothing)."""
        got: dict[str, bytes] = {}
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                raw = f.read()
            h.update(raw)
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
                for m in tar:
                    if not m.isfile() or m.name.endswith(".cls"):
                        continue
                    fobj = tar.extractfile(m)
                    if fobj is not None:
                        got[m.name] = fobj.read()
        except (OSError, tarfile.TarError) as exc:
            return got, f"shard {path} is damaged ({type(exc).__name__}: {exc})"
        if h.hexdigest() != entry["sha256"]:
            return {}, f"shard {path} does not match the manifest's sha256"
        return got, None

    def _shuffled(self, records: Iterator[Any], epoch: int, slot: int) -> Iterator[Any]:
        """A seeded shuffle buffer over ``records`` (WebDataset's ``shuffle(n)``): fill the
        buffer, then emit a random element and put the next record in its place; at the end
        emit what is left in random order."""
        if self.buffer <= 1:
            yield from records
            return
        rng = random.Random(
            (self.seed * 1_000_003 + epoch * 10_007 + self.rank * 101 + slot) % (2**63 - 1)
        )
        buf: list[Any] = []
        for rec in records:
            if len(buf) < self.buffer:
                buf.append(rec)
                continue
            j = rng.randrange(len(buf))
            buf[j], rec = rec, buf[j]
            yield rec
        rng.shuffle(buf)
        yield from buf

    def _decode(self, rec: tuple[str, int, bytes | None, str | None], epoch: int, slot: int,
                i: int) -> StreamItem:  # fmt: skip
        """Decode and transform one record, its augmentation seeded by its place in the stream."""
        name, label, data, error = rec
        if data is not None:
            s = (self.seed * 1_000_003 + epoch * 100_003 + (self.rank * self.workers + slot)
                 * 1_000_000_007 + i) % (2**63 - 1)  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                seed_cpu_rng(s)
                try:
                    return StreamItem(decode_sample(io.BytesIO(data), self.transform), label, name)
                except (OSError, ValueError, SyntaxError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
        if self.strict:
            raise DatasetError(
                f"unreadable sample {self.root / self.split / name} ({error}); {_SHARD_FIX}"
            )
        return StreamItem(None, label, name, error)


class StreamTally:
    """The unreadable samples a :class:`ShardStream` yielded, counted and named on the log once."""

    SHOW = 5

    def __init__(self, name: str) -> None:
        self.name = name
        self.skipped: dict[str, str] = {}
        self.events = 0
        self._reported: set[str] = set()

    def add(self, bad: Sequence[str]) -> None:
        """Record one batch's ``"name: why"`` entries (:func:`collate_stream`)."""
        for entry in bad:
            name, _, why = entry.partition(": ")
            self.skipped.setdefault(name, why)
            self.events += 1

    def report(self, log: Callable[[str], Any]) -> None:
        new = sorted(set(self.skipped) - self._reported)
        if not new:
            return
        self._reported |= set(new)
        shown = "; ".join(f"{n} ({self.skipped[n]})" for n in new[: self.SHOW])
        log(f"[data] {self.name}: skipped {len(new)} unreadable sample(s): {shown}"
            + (", ..." if len(new) > self.SHOW else "") + " (strict_data makes them fatal)")  # fmt: skip
