"""Running a test file as the workers of a 2-process gloo group on CPU (``torchrun``), and cutting
a training run short on every rank at the same step (a crash after a checkpoint)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from harness.launch import TorchrunOptions, torchrun_command

ROOT = Path(__file__).resolve().parents[1]


def run_workers(script: Path, *args: str, nproc: int = 2, timeout: float = 900) -> str:
    """Run ``script args...`` as ``nproc`` torchrun workers (one thread each, the checkout and
    tests/ on the path); returns their stdout.

    Raises:
        AssertionError: A worker failed (the message holds the end of stderr).
    """
    cmd = torchrun_command([], TorchrunOptions(nproc_per_node=nproc))
    cmd = [*cmd[: cmd.index("-m", 3)], str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


class Cut(Exception):
    """Raised on every rank at the same step to simulate a crash after a checkpoint."""


@contextlib.contextmanager
def cut_at(module: ModuleType, step: int) -> Iterator[None]:
    """Within the block, ``module.lr_at`` (called on every rank as a step starts) raises
    :class:`Cut` when step ``step`` starts; the block ends there (the cut is swallowed)."""
    original = module.lr_at

    def cut(at, *a, **k):  # type: ignore[no-untyped-def]
        if at == step:
            raise Cut
        return original(at, *a, **k)

    module.lr_at = cut
    try:
        yield
    except Cut:
        pass
    finally:
        module.lr_at = original
