"""The files ``mimbench import`` / ``export`` read and write: a checkpoint's sidecar, and the guard
that keeps a command from writing over what it reads or what the user has."""

from __future__ import annotations

import os
from pathlib import Path

from harness.core.errors import UserError


def source_files(src: str | Path) -> list[Path]:
    """A checkpoint file and the ``.json`` sidecar that may carry its metadata."""
    path = Path(src)
    return [path, path.with_suffix(".json")] if path.suffix != ".json" else [path]


def guard_outputs(outputs: list[Path], sources: list[Path], overwrite: bool = False) -> None:
    """Refuse to write over a file being read, or over an existing file unless ``overwrite``.

    Args:
        outputs: The files a command is about to write.
        sources: The files it reads (never replaced, even with ``overwrite``).
        overwrite: Whether existing outputs may be replaced (``--overwrite``).

    Raises:
        UserError: naming the file and the fix; nothing has been written.
    """
    srcs = [p for p in sources if p.exists()]
    for out in outputs:
        for src in srcs:
            if out.exists() and os.path.samefile(out, src):
                raise UserError(
                    f"--out would write {out}, which is {src}, a file this command reads: it "
                    "would be replaced; choose another --out"
                )
    existing = [str(o) for o in outputs if o.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: pass "
            "--overwrite to replace it, or choose another --out"
        )
