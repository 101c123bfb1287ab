"""Progress bars and scalar logging for long loops: tqdm bars, TensorBoard, optional W&B.

* :func:`progress` wraps a loop in a tqdm bar with rate and ETA when stderr is a terminal (or
  ``MIMBENCH_PROGRESS=1``); in logs, CI and SLURM output files it stays silent
  (``MIMBENCH_PROGRESS=0`` forces that) and the stages' own progress lines, which
  ``mimbench status`` reads, carry the same information.
* :class:`ScalarLogger` writes scalars (loss, lr, throughput, metrics) under a stage directory:
  TensorBoard event files in ``<stage>/tb`` when the ``tensorboard`` package is installed (it is a
  dependency; ``tensorboard --logdir runs/`` shows every stage of every suite), and Weights &
  Biases when ``wandb`` is installed and ``MIMBENCH_WANDB_PROJECT`` names a project
  (``WANDB_MODE=offline`` works without a network). Only the main process of a distributed run
  logs (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    """Bars on when ``MIMBENCH_PROGRESS`` says so, else when stderr is a terminal."""
    env = os.environ.get("MIMBENCH_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             initial: int = 0, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), silent when disabled
    (:func:`progress_enabled`) or not ``enabled`` (ranks > 0 under torchrun)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit, dynamic_ncols=True,
                disable=not (enabled and progress_enabled()), leave=False)  # fmt: skip


class ScalarLogger:
    """Scalars of one stage to TensorBoard (and W&B when configured).

    Args:
        out_dir: The stage directory; event files go to ``out_dir/tb``.
        run_name: Name of the run in W&B (default: the directory name).
        config: The resolved config, stored with the W&B run.
        enabled: False on non-main ranks: nothing is written.
    """

    def __init__(self, out_dir: str | Path, run_name: str | None = None,
                 config: dict[str, Any] | None = None, enabled: bool = True) -> None:  # fmt: skip
        self.tb: Any = None
        self.wandb: Any = None
        if not enabled:
            return
        out = Path(out_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tb"))
        except ImportError:  # tensorboard not installed: scalars stay in the stage's own logs
            self.tb = None
        project = os.environ.get("MIMBENCH_WANDB_PROJECT")
        if project:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self.wandb = wandb.init(project=project, name=run_name or out.name, dir=str(out),
                                        config=config or {}, resume="allow", id=_wandb_id(out))  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log ``{tag: value}`` at ``step``."""
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> ScalarLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _wandb_id(out: Path) -> str:
    """A stable W&B run id per stage directory, so a resumed stage continues its run."""
    import hashlib

    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
