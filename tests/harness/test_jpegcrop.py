"""The JPEG crop decoder (libjpeg-turbo's partial decode): the box equals the same box of a full
decode by torchvision for every chroma layout, progressive and greyscale files and boxes at the
image's and the iMCU grid's edges; the fast transform gives the same crops with and without it;
a truncated or corrupt file is left to the full decode; where it cannot be built it says why
and the fast path still works."""

from __future__ import annotations

import io
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from harness.core.data import jpegcrop
from harness.core.data.fastdecode import DraftRandomResizedCrop


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Gradients, discs and noise: chroma that changes from pixel to pixel, so a wrong
    upsampling at a column edge shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([127 + 120 * np.sin(x / (7 + 5 * k) + y / 13 + k) for k in range(3)], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 40)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    arr += rng.normal(0, 10, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


#: (name, PIL save options, greyscale): the layouts libjpeg-turbo decodes differently.
VARIANTS = [
    ("4:2:0", {"subsampling": 2}, False),
    ("4:2:2", {"subsampling": 1}, False),
    ("4:4:4", {"subsampling": 0}, False),
    ("progressive", {"progressive": True, "subsampling": 2}, False),
    ("greyscale", {}, True),
]


def encode(img: Image.Image, opts: dict, grey: bool) -> bytes:
    buf = io.BytesIO()
    (img.convert("L") if grey else img).save(buf, format="JPEG", quality=90, **opts)
    return buf.getvalue()


def full_decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@pytest.fixture(scope="module")
def built() -> None:
    """The decoder, built here: CI's machine has a compiler and libjpeg-turbo's headers; a
    machine without them skips these tests with the reason (the fallback is tested below)."""
    jpegcrop.reset()
    if jpegcrop.library() is None:
        pytest.skip(jpegcrop.status())


def boxes(w: int, h: int, n: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``n`` boxes (top, left, h, w): random ones, and ones snapped to the 16-pixel iMCU grid
    or to the image's edges, down to one pixel."""
    rng = random.Random(seed)
    out = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (0, 16, h, 16), (5, 15, 7, 2)]
    while len(out) < n:
        bh, bw = rng.randint(1, h), rng.randint(1, w)
        top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
        if rng.random() < 0.3:
            left = left // 16 * 16
        if rng.random() < 0.3:  # the right edge on the grid
            bw = max(1, min(w - left, (left + bw) // 16 * 16 - left))
        if rng.random() < 0.2:
            left, bw = w - bw, bw  # flush right
        if rng.random() < 0.2:
            top = h - bh  # flush bottom
        out.append((top, left, bh, bw))
    return out


@pytest.mark.parametrize("name,opts,grey", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("size", [(173, 97), (240, 180)])
def test_the_box_equals_the_box_of_a_full_decode(built, name, opts, grey, size):
    w, h = size
    data = encode(photo(w, h, seed=w), opts, grey)
    full = full_decode(data)
    for top, left, bh, bw in boxes(w, h, 60, seed=h):
        got = jpegcrop.decode_box(bytearray(data), top, left, bh, bw, w)
        assert got is not None
        want = full[:, top : top + bh, left : left + bw]
        assert got.shape == want.shape and got.dtype == torch.uint8
        assert torch.equal(got, want), (name, (top, left, bh, bw),
                                        (got.int() - want.int()).abs().max().item())  # fmt: skip


def test_without_the_margin_the_right_edge_column_differs(built, monkeypatch):
    """Why the decoded range is one column wider than the box: with no margin, libjpeg-turbo
    upsamples the chroma of a range's last column as the image's edge (4:2:0)."""
    w, h = 240, 180
    data = encode(photo(w, h), {"subsampling": 2}, False)
    full = full_decode(data)
    monkeypatch.setattr(jpegcrop, "MARGIN", 0)
    differs = []
    for top, left, bh, bw in boxes(w, h, 40, seed=1):
        got = jpegcrop.decode_box(bytearray(data), top, left, bh, bw, w)
        assert got is not None
        differs.append(not torch.equal(got, full[:, top : top + bh, left : left + bw]))
    assert any(differs)


@pytest.mark.parametrize("output", ["uint8", "pil"])
def test_the_fast_transform_gives_the_same_crops_with_and_without_it(built, output):
    """Same seeds, MAE's crop of an ImageNet-sized JPEG at 224 px (the tensor route): the crop
    decoder's output equals the whole-image decode's, bit for bit."""
    data = encode(photo(500, 375), {"subsampling": 2}, False)
    box = DraftRandomResizedCrop(224, scale=(0.2, 1.0), output=output)
    full = DraftRandomResizedCrop(224, scale=(0.2, 1.0), output=output, crop_decode=False)
    for seed in range(12):
        torch.manual_seed(seed)
        a = box(Image.open(io.BytesIO(data)))
        torch.manual_seed(seed)
        b = full(Image.open(io.BytesIO(data)))
        assert box.last_box == full.last_box and box.last_route == full.last_route == "tensor"
        assert (box.last_decode, full.last_decode) == ("box", "full")
        if output == "pil":
            a, b = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        assert torch.equal(a, b), seed


def test_a_truncated_file_is_left_to_the_full_decode(built):
    """No end-of-image marker: the partial decode would stop above the damage and miss it, so
    the file goes to the full decode, which reports it unreadable (an OSError, skipped and
    counted by the readers) as before."""
    data = encode(photo(500, 375), {}, False)[:-3000]
    assert jpegcrop.decode_box(bytearray(data), 0, 0, 16, 16, 500) is None
    fast = DraftRandomResizedCrop(224, scale=(0.2, 1.0))
    with pytest.raises(OSError, match="JPEG does not decode"):
        fast(Image.open(io.BytesIO(data)))
    assert fast.last_route == "tensor" and fast.last_decode == "full"


def test_a_corrupt_file_is_an_error_not_a_crash(built):
    """libjpeg's fatal errors come back as a return code (the helper's error handler jumps out
    of the decode; libjpeg's default one would end the process): header garbage and a box
    outside the image give None."""
    good = encode(photo(64, 48), {}, False)
    garbage = bytearray(b"\xff\xd8\xff\xc0" + bytes(range(256)) * 4 + jpegcrop.EOI)
    assert jpegcrop.decode_box(garbage, 0, 0, 8, 8, 64) is None
    assert jpegcrop.decode_box(bytearray(good), 40, 0, 16, 16, 64) is None  # rows 40-55 of 48
    got = jpegcrop.decode_box(bytearray(good), 0, 0, 48, 64, 64)  # the process is still fine
    assert got is not None and torch.equal(got, full_decode(good))


def test_where_it_cannot_be_built_it_says_why_and_the_fast_path_decodes_the_whole_image(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    jpegcrop.reset()
    try:
        assert jpegcrop.library() is None
        line = jpegcrop.status()
        assert "off" in line and "no-such-compiler" in line and "libjpeg-dev" in line
        assert not list(tmp_path.rglob("*.so"))
        data = encode(photo(500, 375), {}, False)
        fast = DraftRandomResizedCrop(224, scale=(0.2, 1.0))
        out = fast(Image.open(io.BytesIO(data)))
        assert out.shape == (3, 224, 224) and fast.last_decode == "full"
    finally:
        jpegcrop.reset()


def test_a_failed_compile_names_the_compilers_error(tmp_path, monkeypatch):
    """A compiler that runs but fails (here: a script printing an error) is reported with its
    error line, and nothing is left in the cache."""
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'jpegcrop.c:1:10: fatal error: jpeglib.h: No such file' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(jpegcrop.JpegCropUnavailable, match="jpeglib.h: No such file"):
        jpegcrop.build()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MIMBENCH_JPEG_CROP", "0")
    jpegcrop.reset()
    try:
        assert jpegcrop.library() is None and "MIMBENCH_JPEG_CROP=0" in jpegcrop.status()
    finally:
        jpegcrop.reset()


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")
def test_it_is_built_where_a_compiler_and_libjpeg_turbos_headers_are():
    """The machine has a compiler and jpeglib.h (libjpeg-turbo's): then the decoder must be on
    (a build that broke would otherwise only show as a slower benchmark)."""
    probe = subprocess.run(["cc", "-E", "-x", "c", "-"], input="#include <jpeglib.h>\n",
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0 or "LIBJPEG_TURBO" not in probe.stdout + _jconfig(probe.stdout):
        pytest.skip("no libjpeg-turbo headers (apt-get install libjpeg-dev)")
    jpegcrop.reset()
    assert jpegcrop.library() is not None, jpegcrop.status()
    assert "libjpeg-turbo" in jpegcrop.status()


def _jconfig(preprocessed: str) -> str:
    """The text of the jconfig.h the preprocessed output included (it holds the turbo macros,
    which ``-E`` output drops once expanded)."""
    for line in preprocessed.splitlines():
        if line.startswith("# ") and "jconfig.h" in line:
            path = line.split('"')[1]
            with open(path) as f:
                return f.read()
    return ""
