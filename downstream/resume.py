"""Resumable checkpoints of the training tasks (fine-tuning, MAE's linear probe): the policy of
:class:`harness.core.training.ResumableCheckpoint` keyed by what a task's result depends on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.config import DataConfig, TaskConfig
from harness.core.fsutil import config_hash
from harness.core.training import ResumableCheckpoint

from .features import encoder_fingerprint

#: How to start a task over when its directory holds a checkpoint of another config.
TASK_FIX = (
    "delete it (or its task directory) to start this task over, or run the suite into another "
    "output directory"
)


def task_checkpoint(
    path: Path, cfg: TaskConfig, encoder: Any, data: DataConfig, seed: int
) -> ResumableCheckpoint:
    """The checkpoint at ``path`` of a task run: the task config, the encoder's weights, the data
    and the seed make its hash, so a checkpoint of any other run is refused on resume."""
    chash = config_hash(
        {
            "cfg": cfg.model_dump(mode="json"),
            "encoder": encoder_fingerprint(encoder),
            "data": data.model_dump(mode="json"),
            "seed": seed,
        }
    )
    return ResumableCheckpoint(path, chash, fix=TASK_FIX)
