"""Filesystem helpers: atomic writes, file hashing, config hashing and stage locks.

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
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from harness.core.errors import UserError

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


def cache_home() -> Path:
    """mimbench's cache directory: ``$MIMBENCH_CACHE``, or ``~/.cache/mimbench`` when the
    variable is unset (generated datasets, feature caches, built helpers live under it)."""
    env = os.environ.get("MIMBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimbench"


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


def pretrain_config_hash(plain: dict[str, Any]) -> str:
    """The hash of a resolved pretraining config (plain dict) less its ``name`` and
    ``output_dir``, which place a run but do not change its result: the key of a pretraining
    stage directory and the hash its checkpoint carries.

    A streaming run (``data.stream``) leaves out ``data.num_workers`` too: like the number of
    ranks, it shapes the stream's order, which the checkpoint records and a resume checks
    (naming the numbers to resume with) rather than refusing the run as another config."""
    kept = {k: v for k, v in plain.items() if k not in ("output_dir", "name")}
    data = kept.get("data")
    if isinstance(data, dict) and data.get("stream"):
        kept["data"] = {k: v for k, v in data.items() if k != "num_workers"}
    return config_hash(kept)


# ---------------------------------------------------------------------------------------------
# Stage locks
#
# One process at a time may run a stage (a pretraining or a task run) or a whole suite. The lock
# is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+, so it
# works on the shared filesystems SLURM jobs use, where ``flock`` may not), holding the holder's
# host, pid, start time and command. While held, a daemon thread touches the file every
# ``HEARTBEAT_S`` seconds. A lock is *stale* (its holder is gone) when its holder ran on this host
# and that pid no longer exists, or when its heartbeat is older than ``STALE_S`` (a holder on
# another host, or a reused pid); a stale lock is taken over. The file is removed on release.
# ---------------------------------------------------------------------------------------------

STAGE_LOCK = "stage.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0

_held: dict[str, int] = {}  # lock paths this process holds -> nesting depth (re-entrant)


class LockHeldError(UserError):
    """Another live process holds a lock (see :func:`stage_lock`)."""


def _this_host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_lock(path: PathLike) -> dict[str, Any] | None:
    """The holder a lock file names (``host``, ``pid``, ``started_at``, ``command``), with the
    file's age in seconds as ``age_s``; None when there is no lock file."""
    p = Path(path)
    try:
        text = p.read_text()
        age = max(0.0, time.time() - p.stat().st_mtime)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:  # being written right now, or garbage: treat by its age only
        info = {}
    if not isinstance(info, dict):
        info = {}
    info["age_s"] = age
    return info


def lock_holder_alive(info: dict[str, Any], stale_s: float = STALE_S) -> bool:
    """Whether the holder a lock file names (see :func:`read_lock`) is still running."""
    if float(info.get("age_s", 0.0)) > stale_s:
        return False  # no heartbeat for too long: dead (another host) or a reused pid
    if info.get("host") == _this_host() and isinstance(info.get("pid"), int):
        return info["pid"] == os.getpid() or _pid_alive(info["pid"])
    return True  # another host with a fresh heartbeat


def describe_holder(info: dict[str, Any]) -> str:
    """``pid P on host H since T (command C)`` for messages."""
    cmd = info.get("command") or ""
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('started_at', '?')}" + (f" ({cmd[:120]})" if cmd else ""))


def _try_create(path: Path, payload: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _break_stale(path: Path, info: dict[str, Any]) -> None:
    """Remove a stale lock file, unless it changed since ``info`` was read (then a new holder
    took it over first, and the next attempt sees that one)."""
    grave = path.with_name(f"{path.name}.stale-{_this_host()}-{os.getpid()}")
    try:
        os.replace(path, grave)  # atomic: of several processes breaking it, one gets the file
    except FileNotFoundError:
        return
    now = read_lock(grave) or {}
    now.pop("age_s", None)
    was = {k: v for k, v in info.items() if k != "age_s"}
    if was and now and now != was:  # we took a fresh lock away: give it back
        with contextlib.suppress(OSError):
            os.link(grave, path)
    with contextlib.suppress(OSError):
        os.unlink(grave)


def _heartbeat(path: Path, stop: Any, every: float) -> None:
    while not stop.wait(every):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def stage_lock(path: PathLike, what: str, stale_s: float = STALE_S,
               heartbeat_s: float = HEARTBEAT_S) -> Iterator[Path]:
    """Hold the lock file ``path`` while the body runs (re-entrant within one process).

    Args:
        path: The lock file (its directory is created).
        what: The locked thing, for the refusal message ("stage pretrain/mae-s0-...").
        stale_s: A lock not touched for this long belongs to a dead holder.
        heartbeat_s: How often the holder touches the file.

    Raises:
        LockHeldError: A live process holds it; the message names the holder and the file.
    """
    lock = Path(path)
    key = str(lock.resolve())
    if _held.get(key):
        _held[key] += 1
        try:
            yield lock
        finally:
            _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({
        "host": _this_host(), "pid": os.getpid(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
    }).encode()
    for _ in range(5):
        if _try_create(lock, payload):
            break
        info = read_lock(lock)
        if info is None:
            continue  # released meanwhile: try again
        if lock_holder_alive(info, stale_s):
            raise LockHeldError(
                f"{what} is being run by {describe_holder(info)}; lock file {lock}. Wait for it "
                f"to finish (`mimbench status` shows it), or, if that process is gone, delete "
                "the lock file and run again"
            )
        _break_stale(lock, info)
    else:
        raise LockHeldError(f"could not take the lock {lock} for {what}: other processes keep "
                            "taking it; run again")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop, heartbeat_s), daemon=True)
    beat.start()
    _held[key] = 1
    try:
        yield lock
    finally:
        _held.pop(key, None)
        stop.set()
        beat.join(timeout=5)
        mine = read_lock(lock) or {}
        if (mine.get("host"), mine.get("pid")) == (_this_host(), os.getpid()):
            with contextlib.suppress(OSError):
                os.unlink(lock)
