"""Provenance of a run: source revision, software versions and hardware.

:func:`collect_provenance` returns a plain JSON-serializable dict that every run record stores,
so a number in a table can be traced to the code, packages and machine that produced it. It
never raises: anything that cannot be determined is reported as ``None``.

The OpenMMLab packages are looked up through their installed metadata only; importing them is
slow and must stay confined to the detection and segmentation tasks.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: Reported name -> distribution name on the package index.
TRACKED_PACKAGES: dict[str, str] = {
    "mimbench": "mimbench",
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "pandas": "pandas",
    "pydantic": "pydantic",
    "mmengine": "mmengine",
    "mmcv": "mmcv",
    "mmdet": "mmdet",
    "mmseg": "mmsegmentation",
    "pycocotools": "pycocotools",
}

#: Environment variables that change how a run uses the hardware.
TRACKED_ENV_VARS: tuple[str, ...] = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "SLURM_JOB_ID",
    "WORLD_SIZE",
)

_GIT_TIMEOUT_S = 10.0
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def collect_provenance(command: list[str] | None = None) -> dict[str, Any]:
    """Collects the provenance of the current process.

    Package versions and hardware are computed once per process; the git state is read on every
    call because the working tree may change between runs of a long-lived process.

    Args:
        command: The command line that started the run; defaults to ``sys.argv``.

    Returns:
        A JSON-serializable dict with keys ``git`` (``sha``, ``dirty``), ``python``,
        ``platform``, ``hostname``, ``command``, ``cwd`` (the directory the run was started
        from, against which relative paths of the command and config are meant), ``packages``,
        ``hardware`` and ``env``.
    """
    return {
        "git": git_state(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "hostname": _hostname(),
        "command": list(sys.argv if command is None else command),
        "cwd": str(Path.cwd().resolve()),
        "packages": dict(package_versions()),
        "hardware": copy.deepcopy(hardware_info(torch_loaded="torch" in sys.modules)),
        "env": {name: os.environ.get(name) for name in TRACKED_ENV_VARS if name in os.environ},
    }


def git_state(root: Path | None = None) -> dict[str, Any]:
    """Returns the git revision and dirty flag of the mimbench source tree.

    Args:
        root: Directory expected to be the top of the checkout; defaults to the directory that
            holds the ``harness`` package.

    Returns:
        ``{"sha": str | None, "dirty": bool | None}``; both ``None`` when the source is not a
        git checkout of its own (e.g. an installed wheel) or git is unavailable. ``dirty``
        reflects changes to tracked files only.
    """
    root = _SOURCE_ROOT if root is None else root
    toplevel = _git(root, "rev-parse", "--show-toplevel")
    if toplevel is None or not _same_path(Path(toplevel), root):
        return {"sha": None, "dirty": None}
    sha = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _git(cwd: Path, *args: str) -> str | None:
    """Runs a read-only git command; returns stripped stdout, or ``None`` on any failure."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        proc = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip()


def _same_path(a: Path, b: Path) -> bool:
    """Compares two paths after resolving symlinks; never raises."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _hostname() -> str | None:
    """Returns the host name, or ``None`` if it cannot be read."""
    try:
        return socket.gethostname()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Returns installed versions of the tracked packages (``None`` when absent).

    Reads distribution metadata only; no package is imported.
    """
    return {name: _distribution_version(dist) for name, dist in TRACKED_PACKAGES.items()}


def _distribution_version(dist: str) -> str | None:
    """Returns the installed version of a distribution, or ``None``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # broken metadata must not break a run
        return None


@functools.lru_cache(maxsize=2)
def hardware_info(torch_loaded: bool) -> dict[str, Any]:
    """Describes the machine: CPU, memory and, when torch is loaded, threads and CUDA devices.

    torch is consulted only when it is already imported (``torch_loaded``), so collecting
    provenance never pays torch's import time; every run that evaluates an encoder has it loaded.

    Args:
        torch_loaded: Whether ``torch`` is in ``sys.modules``; part of the cache key so the
            answer is refreshed once torch has been imported.
    """
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _cpu_affinity(),
        "machine": platform.machine(),
        "ram_bytes": _total_ram_bytes(),
    }
    info.update(_torch_info() if torch_loaded else _no_torch_info())
    return info


def _cpu_model() -> str | None:
    """Returns the CPU model name from /proc/cpuinfo, falling back to :mod:`platform`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or None


def _cpu_affinity() -> int | None:
    """Returns how many CPUs this process may run on, where the OS says."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _total_ram_bytes() -> int | None:
    """Returns total physical memory in bytes, or ``None`` where unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _no_torch_info() -> dict[str, Any]:
    """The torch-dependent hardware fields, all unknown."""
    return {
        "torch_threads": None,
        "cuda_available": None,
        "cuda_version": None,
        "cuda_device_count": None,
        "cuda_devices": None,
    }


def _torch_info() -> dict[str, Any]:
    """Reads threads and CUDA devices from the already imported torch; never raises."""
    info = _no_torch_info()
    torch = sys.modules.get("torch")
    if torch is None:
        return info
    try:
        info["torch_threads"] = int(torch.get_num_threads())
        info["cuda_version"] = getattr(torch.version, "cuda", None)
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            count = int(torch.cuda.device_count())
            info["cuda_device_count"] = count
            info["cuda_devices"] = [str(torch.cuda.get_device_name(i)) for i in range(count)]
        else:
            info["cuda_device_count"] = 0
    except Exception:  # a broken CUDA setup must not break a run
        pass
    return info
