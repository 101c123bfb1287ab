"""``mimbench bench data``: images per second per loader worker of the pretraining input
pipeline, three ways side by side on the same JPEGs in one run.

    mimbench bench data                              # 512 JPEGs of about 500 x 375, 1 worker
    mimbench bench data --images 2000 --workers 4 --img-size 224 --repeat 3

Rows (each a DataLoader pass over the same train split, after one warm-up batch):

* ``baseline``: torchvision's ImageFolder + PIL with the papers' pretraining transform (MAE
  ``main_pretrain.py``: RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), horizontal flip,
  ToTensor, Normalize), float batches: what users of the reference code have.
* ``fast/imagefolder``: our path on the same folder: the seeded checked ImageFolder the engine
  reads, :class:`~harness.core.data.fastdecode.DraftRandomResizedCrop` (the same crop and flip
  draws; a reduced-size JPEG decode where the crop is downscaled by 2x or more, else
  torchvision's ``decode_jpeg`` and torch's uint8 antialiased bicubic resize of the box), uint8
  batches normalised on the device (:func:`~harness.core.data.fastdecode.to_device_normalized`,
  counted in the time: on a CPU run the main process does it, beside the worker), persistent
  workers and prefetching.
* ``fast/shards``: the same transform on the folder's WebDataset shards read as a stream
  (:class:`~harness.core.data.shards.ShardStream`: one sequential read per shard).

The JPEGs are generated into a temporary directory (``--dir`` keeps them): smooth gradients and
discs with noise, sizes drawn around ImageNet's typical 500 x 375, quality 90 (about 100 kB each,
near ImageNet's mean file size). Rows are measured in turn, ``--repeat`` rounds, and each row's
best round is reported, so other load on the machine hits all rows alike. Per worker:
images/s divided by ``--workers`` (0 workers: the main process, counted as one).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from harness.cli_args import CliParser, int_at_least
from harness.core.data import jpegcrop
from harness.core.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SeededDataset,
    collate_skipping,
    imagefolder_checked,
)
from harness.core.data.fastdecode import (
    DraftRandomResizedCrop,
    fast_pretrain_transform,
    loader_options,
    to_device_normalized,
)
from harness.core.data.shards import ShardStream, collate_stream, write_shards

#: MAE's pretraining crop scale (``main_pretrain.py``).
CROP_SCALE = (0.2, 1.0)
ROWS = ("baseline", "fast/imagefolder", "fast/shards")
CLASSES = 4


def make_jpegs(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> Path:
    """An ImageFolder of ``n`` train JPEGs (and one val image per class) at about ``size``."""
    rng = np.random.default_rng(seed)
    w0, h0 = size
    for split, count in (("train", n), ("val", CLASSES)):
        for i in range(count):
            d = root / split / f"c{i % CLASSES}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(w0 * rng.uniform(0.8, 1.0)), int(h0 * rng.uniform(0.8, 1.0))
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            phase = rng.uniform(0, 6, 3)
            arr = np.stack([127 + 120 * np.sin(x / (17 + 9 * k) + y / 29 + phase[k])
                            for k in range(3)], -1)  # fmt: skip
            for _ in range(3):
                cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 90)
                arr[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
            arr += rng.normal(0, 12, arr.shape)
            img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
            img.save(d / f"{i:06d}.jpg", quality=90)
    return root


def _baseline_tf(img: int) -> transforms.Compose:
    """MAE's pretraining transform (``main_pretrain.py``)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img, scale=CROP_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


def baseline_loader(root: Path, img: int, batch: int, workers: int) -> DataLoader:
    """torchvision's ImageFolder + PIL with the papers' pretraining transform."""
    ds = datasets.ImageFolder(str(root / "train"), transform=_baseline_tf(img))
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def fast_folder_loader(root: Path, img: int, batch: int, workers: int, device: torch.device) -> DataLoader:
    """Our path on the ImageFolder: what the engine reads with ``data.fast_decode: true``."""
    ds = imagefolder_checked(root, "train", fast_pretrain_transform(img, CROP_SCALE, True),
                             min_classes=1)  # fmt: skip
    return DataLoader(SeededDataset(ds, 0), batch_size=batch, shuffle=True, drop_last=True,
                      collate_fn=collate_skipping, **loader_options(workers, device))  # fmt: skip


def fast_shard_loader(root: Path, img: int, batch: int, workers: int, device: torch.device) -> DataLoader:
    """Our path on the shards, streamed."""
    stream = ShardStream(root, "train", fast_pretrain_transform(img, CROP_SCALE, True), seed=0,
                         batch_size=batch, num_workers=workers, buffer=256)  # fmt: skip
    stream.set_position(0)
    return DataLoader(stream, batch_size=batch, collate_fn=collate_stream,
                      **loader_options(workers, device))  # fmt: skip


def time_pass(loader: Iterable[Any], device: torch.device) -> tuple[int, float]:
    """Images and seconds of one pass over ``loader`` after its first (warm-up) batch; each
    batch is moved to ``device`` and normalised there when it is uint8."""
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    n, t0 = 0, time.perf_counter()
    for batch in it:
        x = to_device_normalized(batch[0], device)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def measure(
    folder: Path, shards: Path, img: int, batch: int, workers: int, repeat: int,
    device: torch.device, log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Each row's best images/s over ``repeat`` rounds (the rows measured in turn)."""
    makers = {
        "baseline": lambda: baseline_loader(folder, img, batch, workers),
        "fast/imagefolder": lambda: fast_folder_loader(folder, img, batch, workers, device),
        "fast/shards": lambda: fast_shard_loader(shards, img, batch, workers, device),
    }
    loaders = {row: make() for row, make in makers.items()}  # persistent workers: made once
    best: dict[str, tuple[int, float]] = {}
    ratios: dict[str, list[float]] = {row: [] for row in ROWS}  # to the same round's baseline
    for r in range(repeat):
        rates = {}
        for row in ROWS:
            n, s = time_pass(loaders[row], device)
            log(f"[bench data] round {r + 1}/{repeat} {row}: {n} images in {s:.2f}s")
            rates[row] = n / s
            if row not in best or n / s > best[row][0] / best[row][1]:
                best[row] = (n, s)
        for row in ROWS:
            ratios[row].append(rates[row] / rates["baseline"])
    base = best["baseline"][0] / best["baseline"][1]
    out = []
    for row in ROWS:
        n, s = best[row]
        rate = n / s
        out.append({"row": row, "images": n, "seconds": s, "img_per_s": rate,
                    "img_per_s_per_worker": rate / max(1, workers), "ratio": rate / base,
                    "round_ratio": float(np.median(ratios[row]))})  # fmt: skip
    return out


def stage_profile(folder: Path, img: int, n: int = 64, repeat: int = 3) -> list[tuple[str, float]]:
    """Milliseconds per image of each stage of the baseline and of the fast path's ``tensor``
    route, in this process (one thread), on the same ``n`` JPEGs and crop boxes (MAE's crop
    draws); stages interleaved over ``repeat`` rounds, each stage's best round reported. The
    file bytes are in memory: reading is not counted."""
    import torch.nn.functional as F  # noqa: N812
    from torchvision.io import ImageReadMode, decode_jpeg

    files = sorted((folder / "train").rglob("*.jpg"))[:n]
    datas = [f.read_bytes() for f in files]
    pils = [Image.open(io.BytesIO(d)).convert("RGB") for d in datas]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        boxes = [transforms.RandomResizedCrop.get_params(p, list(CROP_SCALE), [3 / 4, 4 / 3])
                 for p in pils]  # (top, left, h, w)  # fmt: skip
    pil_boxes = [(x0, y0, x0 + w, y0 + h) for y0, x0, h, w in boxes]
    crops = [p.crop(b) for p, b in zip(pils, pil_boxes, strict=True)]
    outs = [c.resize((img, img), Image.Resampling.BICUBIC) for c in crops]
    tensors = [decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)) for d in datas]
    small = [transforms.functional.pil_to_tensor(o) for o in outs]
    to_tensor, normalize = transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    batch = torch.stack(small)
    base_tf, fast_tf = _baseline_tf(img), fast_pretrain_transform(img, CROP_SCALE, True)
    full_tf = DraftRandomResizedCrop(img, scale=CROP_SCALE, crop_decode=False)

    def tv_resize(i: int) -> torch.Tensor:
        x0, y0, x1, y1 = pil_boxes[i]
        box = tensors[i][None, :, y0:y1, x0:x1]  # [1, 3, h, w], a view
        return F.interpolate(box, size=(img, img), mode="bicubic", antialias=True)

    stages: dict[str, Callable[[int], Any]] = {
        "PIL: header parse (Image.open)": lambda i: Image.open(io.BytesIO(datas[i])),
        "PIL: decode + convert RGB": lambda i: Image.open(io.BytesIO(datas[i])).convert("RGB"),
        "PIL: crop (copy)": lambda i: pils[i].crop(pil_boxes[i]),
        "PIL: bicubic resize of the crop": lambda i: crops[i].resize((img, img), Image.Resampling.BICUBIC),
        "PIL: flip": lambda i: outs[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "ToTensor (float)": lambda i: to_tensor(outs[i]),
        "Normalize": lambda i: normalize(small[i].float()),
        "torchvision decode_jpeg (uint8 tensor)": lambda i: decode_jpeg(
            torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8), mode=ImageReadMode.RGB),
        "libjpeg-turbo partial decode of the box (jpegcrop)": lambda i: jpegcrop.decode_box(
            bytearray(datas[i]), boxes[i][0], boxes[i][1], boxes[i][2], boxes[i][3], pils[i].size[0]),
        "torch: uint8 antialiased bicubic resize of the box": tv_resize,
        "torch: flip (uint8)": lambda i: small[i].flip(-1),
        "uint8 batch normalised on the device (cpu)": lambda i: to_device_normalized(
            batch[i % len(batch)][None], torch.device("cpu")),
        "whole baseline transform (decode to normalised)": lambda i: base_tf(
            Image.open(io.BytesIO(datas[i])).convert("RGB")),
        "whole fast transform (decode to uint8)": lambda i: fast_tf(Image.open(io.BytesIO(datas[i]))),
        "whole fast transform, whole-image decode": lambda i: full_tf(Image.open(io.BytesIO(datas[i]))),
    }  # fmt: skip
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(repeat):
        for name, fn in stages.items():
            t0 = time.perf_counter()
            for i in range(len(datas)):
                fn(i)
            best[name] = min(best[name], (time.perf_counter() - t0) * 1000 / len(datas))
    return list(best.items())


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: best rates, the ratio of the best rates, and the median
    over rounds of each round's ratio (the rows of one round ran back to back)."""
    lines = ["| row | images | s | img/s | img/s per worker | vs baseline | median round ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['row']} | {r['images']} | {r['seconds']:.2f} | {r['img_per_s']:.1f} | "
                     f"{r['img_per_s_per_worker']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['round_ratio']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="mimbench bench data", description=__doc__.split("\n\n")[0].replace("``", "`"))
    p.add_argument("--images", type=int_at_least(8), default=512, help="train JPEGs (default 512)")
    p.add_argument("--width", type=int_at_least(16), default=500, help="largest width (default 500)")
    p.add_argument("--height", type=int_at_least(16), default=375,
                   help="largest height (default 375)")
    p.add_argument("--img-size", type=int_at_least(8), default=224,
                   help="crop output side (default 224, the papers')")
    p.add_argument("--batch", type=int_at_least(1), default=32, help="images per batch")
    p.add_argument("--workers", type=int_at_least(0), default=1,
                   help="DataLoader workers per row (default 1; 0: the main process)")
    p.add_argument("--repeat", type=int_at_least(1), default=2,
                   help="rounds; each row's best is reported (default 2)")
    p.add_argument("--device", default="auto", help="where batches are normalised: cpu, cuda, auto")
    p.add_argument("--dir", help="keep the generated JPEGs and shards here (default: a temp dir)")
    p.add_argument("--stages", action="store_true",
                   help="also print where the time of one image goes, stage by stage (ms per "
                        "image in the main process, baseline and fast path on the same crops)")
    return p


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    torch.set_num_threads(1)  # one core per loader, as in a worker
    with tempfile.TemporaryDirectory(prefix="mimbench-bench-data-") as tmp:
        base = Path(args.dir) if args.dir else Path(tmp)
        folder, shards = base / "imagefolder", base / "shards"
        t0 = time.time()
        if not (folder / "train").is_dir():
            make_jpegs(folder, args.images, size=(args.width, args.height))
        per_shard = max(1, args.images // (4 * max(1, args.workers)))
        write_shards(folder, shards, shard_size=per_shard, log=lambda m: None)
        mb = sum(f.stat().st_size for f in (folder / "train").rglob("*.jpg")) / 2**20
        print(f"{args.images} JPEGs up to {args.width} x {args.height} ({mb:.1f} MB) and their "
              f"shards written in {time.time() - t0:.1f}s; crops of {args.img_size} px, batch "
              f"{args.batch}, {args.workers} worker(s), device {device}, best of {args.repeat}")
        print(jpegcrop.status())
        rows = measure(folder, shards, args.img_size, args.batch, args.workers, args.repeat, device)
        stages = stage_profile(folder, args.img_size, repeat=args.repeat) if args.stages else []
    print(format_rows(rows))
    if stages:
        print("\n| stage (one image, this process, 1 thread) | ms |\n| --- | ---: |")
        print("\n".join(f"| {name} | {ms:.2f} |" for name, ms in stages))
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0
