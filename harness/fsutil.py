"""Filesystem helpers: atomic writes, file hashing and config hashing.

Every write goes to a temporary file in the destination directory, is flushed and fsynced, and
then renamed over the destination with :func:`os.replace`. Readers therefore see either the old
file or the complete new one, never a partial write, even with many processes writing into the
same directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike[str]


def _fsync_directory(directory: Path) -> None:
    """Fsyncs a directory so a rename inside it is durable; silently skipped where unsupported."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _set_mode(fd: int, dest: Path) -> None:
    """Gives the temporary file the mode of the file it replaces, or 0o644 for a new file.

    :func:`tempfile.mkstemp` creates files readable by the owner only; results and checkpoints
    should be readable like any other file the user writes.
    """
    try:
        mode = dest.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, mode)


@contextlib.contextmanager
def _atomic_binary_file(path: PathLike) -> Iterator[IO[bytes]]:
    """Yields a binary file object whose content replaces ``path`` atomically on success.

    The temporary file lives in the same directory as ``path`` (so the rename stays on one
    filesystem) and is removed if anything fails before the rename completes.

    Args:
        path: Destination file. Its parent directory is created if missing.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        _set_mode(fd, dest)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(dest.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Writes bytes to ``path`` atomically.

    Args:
        path: Destination file.
        data: Content to write.

    Returns:
        The destination path.
    """
    with _atomic_binary_file(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Writes UTF-8 text to ``path`` atomically.

    Args:
        path: Destination file.
        text: Content to write.

    Returns:
        The destination path.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Writes ``obj`` as JSON (sorted keys, indent 2, trailing newline) to ``path`` atomically.

    Args:
        path: Destination file.
        obj: A JSON-serializable object.

    Returns:
        The destination path.
    """
    text = json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """Saves ``obj`` with :func:`torch.save` to ``path`` atomically.

    Args:
        obj: Anything :func:`torch.save` accepts (our checkpoints hold tensors and plain types).
        path: Destination file.

    Returns:
        The destination path.
    """
    import torch  # lazy: keep the harness importable and fast without touching torch

    with _atomic_binary_file(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Returns the hex SHA-256 digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk: Read size in bytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """Serializes ``obj`` to canonical JSON: sorted keys, no whitespace, ``str`` for unknowns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def config_hash(obj: Any) -> str:
    """Returns a short, stable hash of a (resolved) config.

    Args:
        obj: A JSON-like object; values JSON cannot encode are hashed through ``str``.

    Returns:
        The first 16 hex characters of the SHA-256 of the canonical JSON.
    """
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]
