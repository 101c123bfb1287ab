"""What a shard dataset's manifest costs each process at ImageNet-1k scale, version 1 (every
member listed in manifest.json) against version 2 (per-shard index files), side by side.

    python scripts/manifest_scale.py                 # 1,281,167 train images in shards of 1000
    python scripts/manifest_scale.py --images 200000 --shard-size 500

It writes the two manifests (and version 2's index files) of a synthetic split, with
ImageNet-like keys (``n01440764/n01440764_10026``), byte sizes and offsets, no tar data: only
the manifest is read here. Each measurement runs in a fresh Python process: the seconds to
build a :class:`~harness.core.data.shards.ShardStream` on the split (what every rank does) and
the process's resident memory it adds (while the stream is held; Linux's /proc), and for
version 2 the milliseconds to read one shard's index (what the stream does per shard).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.core.data.shards import FORMAT, INDEX_SUFFIX, MANIFEST, write_index  # noqa: E402

PROBE = """
import json, os, sys, time
from pathlib import Path
from harness.core.data.shards import ShardStream, shard_members
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
base = rss_mb()
root, what = Path(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
if what == "stream":
    stream = ShardStream(root, "train", None, seed=0, batch_size=256)
    n = len(stream.entries)
else:  # one shard's index, 20 times
    entry = json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    t0 = time.perf_counter()
    for _ in range(20):
        held = shard_members(root / "train", entry)
    n = 20
s = time.perf_counter() - t0
print(json.dumps({"seconds": s, "n": n, "rss_mb": rss_mb() - base}))  # the stream still held
"""


def synth_members(start: int, n: int, rng: random.Random) -> list[list]:
    out, off = [], 512
    for i in range(start, start + n):
        c = i % 1000
        wnid = f"n{1440764 + 37 * c:08d}"
        size = rng.randint(20_000, 200_000)
        out.append([f"{wnid}/{wnid}_{i}", "jpeg", c, off, size])
        off += 512 + -(-size // 512) * 512 + 1024  # data blocks and the .cls member
    return out


def write(root: Path, images: int, shard_size: int, version: int) -> int:
    """The two manifests' split (no tars); returns manifest.json's size in bytes."""
    rng = random.Random(0)
    (root / "train").mkdir(parents=True)
    shards = []
    for k, start in enumerate(range(0, images, shard_size)):
        ms = synth_members(start, min(shard_size, images - start), rng)
        name = f"train-{k:06d}.tar"
        entry = {"name": name, "samples": len(ms), "bytes": ms[-1][3] + ms[-1][4] + 2048,
                 "sha256": "0" * 64}  # fmt: skip
        if version == 1:
            entry["members"] = ms
        else:  # the index as `mimbench data shard` writes it (no tar beside it)
            entry |= write_index(root / "train" / name, ms)
        shards.append(entry)
    man = {"format": FORMAT, "version": version, "classes": [f"c{c}" for c in range(1000)],
           "shard_size": shard_size, "seed": 0,
           "splits": {"train": {"samples": images, "shards": shards}}}  # fmt: skip
    text = json.dumps(man)
    (root / MANIFEST).write_text(text)
    return len(text.encode())


def probe(root: Path, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(root), what], capture_output=True,
                         text=True, check=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1_281_167, help="train images (ImageNet-1k's)")
    p.add_argument("--shard-size", type=int, default=1000)
    args = p.parse_args()
    print(f"{args.images} images in shards of {args.shard_size}")
    print("| manifest | manifest.json MB | index files MB | ShardStream s | resident MB "
          "it adds | one index read ms |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="mimbench-manifest-") as tmp:
        for version in (1, 2):
            root = Path(tmp) / f"v{version}"
            size = write(root, args.images, args.shard_size, version)
            idx = sum(f.stat().st_size for f in (root / "train").glob(f"*{INDEX_SUFFIX}"))
            s = probe(root, "stream")
            one = f"{probe(root, 'index')['seconds'] * 1000 / 20:.2f}" if version == 2 else "-"
            print(f"| version {version} | {size / 2**20:.1f} | {idx / 2**20:.1f} | "
                  f"{s['seconds']:.2f} | {s['rss_mb']:.0f} | {one} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
