"""Decoding only the crop box of a JPEG: libjpeg-turbo's partial decode, through the small C
helper ``jpegcrop.c`` beside this file, built on first use and called with ctypes.

Why: on the fast path's ``tensor`` route (:mod:`harness.core.data.fastdecode`), decoding the
whole JPEG was about two thirds of an ImageNet-sized image's time. A RandomResizedCrop keeps
on average about 60 % of the image (MAE's scale 0.2-1), so the helper (1) skips the rows above
the box without their IDCT, upsampling and colour conversion (``jpeg_skip_scanlines``; their
entropy-coded data must still be read), (2) reconstructs only the iMCU columns that hold the
box (``jpeg_crop_scanline``) and (3) stops after the box's last row. NVIDIA DALI's CPU
random-crop decoder takes the same libjpeg-turbo route. ``mimbench bench data --stages`` shows
the decode with and without it.

Pixels: the box equals the same box of a full decode (torchvision's ``decode_jpeg``), byte for
byte, for baseline and progressive JPEGs, 4:2:0 / 4:2:2 / 4:4:4 chroma and greyscale (tests).
For that the decoded column range is asked one column wider on each side than the box:
libjpeg-turbo's fancy chroma upsampling treats the range's edge as the image's edge.

Where it is off, the caller decodes the whole image (same pixels, slower); :func:`status` says
why. It is off when there is no C compiler (``$CC``, else ``cc``) or no libjpeg-turbo >= 1.5
headers and library to build against (Debian / Ubuntu: ``apt-get install libjpeg-dev``), or
when ``MIMBENCH_JPEG_CROP=0``. A file that does not end with the JPEG end-of-image marker
(a truncated file, or bytes after the marker) is left to the full decode, which reports a
truncated file as unreadable exactly as before: the partial decode stops early and would not see
the damage below the box.

The build goes to ``$MIMBENCH_CACHE/jpegcrop/<key>/`` (key: the source, the compiler, the
machine), written to a temporary name and renamed into place, so concurrent loader workers
never load a half-written library. ``python -m harness.core.data.jpegcrop`` builds it and prints
the status (``scripts/setup.sh`` runs it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from harness.core.fsutil import cache_home

SOURCE = Path(__file__).with_name("jpegcrop.c")
LIBRARY_NAME = "libmimjpegcrop.so"
#: Columns asked beyond each side of the box (see the module docstring).
MARGIN = 1
#: The JPEG end-of-image marker.
EOI = b"\xff\xd9"
_MSG_LEN = 200


class JpegCropUnavailable(RuntimeError):
    """The helper cannot be built or loaded here; the message says why and what would fix it."""


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def library_path() -> Path:
    """Where the built helper for this source, compiler and machine lives."""
    key = hashlib.sha256(SOURCE.read_bytes() + f"|{_compiler()}|{platform.machine()}".encode())
    return cache_home() / "jpegcrop" / key.hexdigest()[:16] / LIBRARY_NAME


def build() -> Path:
    """Build the helper unless it is built; return its path.

    Raises:
        JpegCropUnavailable: No compiler, or the compile / link failed (the compiler's last
            line in the message).
    """
    dest = library_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{LIBRARY_NAME}.{os.getpid()}.tmp")
    cmd = [_compiler(), "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-ljpeg"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JpegCropUnavailable(
            f"no C compiler to build the JPEG crop decoder ({cmd[0]}: {exc}); install one (or set "
            "CC) and libjpeg-turbo's headers (apt-get install libjpeg-dev)"
        ) from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "no output")
        raise JpegCropUnavailable(
            f"could not build the JPEG crop decoder ({cmd[0]} ... {SOURCE.name} -ljpeg): {why.strip()}; "
            "it needs libjpeg-turbo >= 1.5 with its headers (apt-get install libjpeg-dev)"
        )
    os.replace(tmp, dest)
    return dest


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """This process's helper, built and loaded once: (the library, None) or (None, why not)."""
    if os.environ.get("MIMBENCH_JPEG_CROP", "1") == "0":
        return None, "turned off (MIMBENCH_JPEG_CROP=0)"
    try:
        # DEEPBIND: the helper's jpeg_* calls go to the libjpeg it was linked against even
        # where another copy's symbols are global in this process (glibc; elsewhere a no-op)
        lib = ctypes.CDLL(str(build()), mode=os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0))
    except JpegCropUnavailable as exc:
        return None, str(exc)
    except OSError as exc:  # built but not loadable (e.g. the library moved)
        return None, f"could not load the JPEG crop decoder: {exc}"
    lib.mim_jpegcrop_decode.restype = ctypes.c_int
    lib.mim_jpegcrop_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_long, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
        ctypes.c_char_p,
    ]  # fmt: skip
    lib.mim_jpegcrop_version.restype = ctypes.c_int
    return lib, None


def library() -> ctypes.CDLL | None:
    """The helper, built and loaded on the first call in this process (None: unavailable,
    :func:`status` says why)."""
    return _load()[0]


def reset() -> None:
    """Forget this process's load (the next :func:`library` call builds / loads again)."""
    _load.cache_clear()


def status() -> str:
    """One line: the partial decode in use (libjpeg-turbo's version, the library), or why not."""
    lib, why = _load()
    if lib is None:
        return f"JPEG crop decode off: {why}"
    v = lib.mim_jpegcrop_version()
    return (f"JPEG crop decode on: libjpeg-turbo {v // 1_000_000}.{v // 1000 % 1000}.{v % 1000} "
            f"partial decode ({library_path()})")  # fmt: skip


def decode_box(data: bytearray | memoryview, top: int, left: int, h: int, w: int,
               width: int) -> torch.Tensor | None:  # fmt: skip
    """The ``h x w`` box at (``top``, ``left``) of the JPEG ``data`` (an image ``width``
    pixels wide) as a ``[3, h, w]`` uint8 tensor (a view into the decoded rows), or None where
    the caller should decode the whole image instead: the helper is unavailable, the data do not
    end with the end-of-image marker, or libjpeg reported an error (the full decode then reports
    it in its own words)."""
    lib = library()
    if lib is None or bytes(data[-2:]) != EOI:
        return None
    x0, x1 = max(0, left - MARGIN), min(width, left + w + MARGIN)
    out = torch.empty(h * width * 3, dtype=torch.uint8)
    got_left, got_width = ctypes.c_int(), ctypes.c_int()
    src = (ctypes.c_char * len(data)).from_buffer(data)
    msg = ctypes.create_string_buffer(_MSG_LEN)
    rc = lib.mim_jpegcrop_decode(src, len(data), top, x0, h, x1 - x0, out.data_ptr(), out.numel(),
                                 ctypes.byref(got_left), ctypes.byref(got_width), msg)  # fmt: skip
    del src  # releases the export of ``data``'s buffer
    if rc != 0:
        return None
    rows = out[: h * got_width.value * 3].view(h, got_width.value, 3)
    start = left - got_left.value
    return rows[:, start : start + w].permute(2, 0, 1)


def main() -> int:
    """Build the helper (if it can be built) and print the status; exit 0 either way."""
    print(status())
    return 0


if __name__ == "__main__":
    sys.exit(main())
