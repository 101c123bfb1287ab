"""Classifiers handed from one task stage to a later one (the robustness suite reads them).

A task that trains a classifier on the encoder (the fast linear probe's chosen head, the
attentive probe's chosen head, the fine-tuned model) saves it in its stage directory as
``classifier.pth``: the task's name, the class names of its train split (in label order), the
head's spec and its weights. A later task of the same encoder and seed names that task in
:meth:`downstream.base.Task.inputs`; the planner hands it the stage directory
(:attr:`downstream.base.TaskContext.inputs`) and :func:`load_classifier` rebuilds the
classifier, images ``[B, 3, H, W]`` -> logits ``[B, C]``, through the builder the saving task
registered with :func:`register_classifier` (one per task; no attribute probing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.core.errors import UserError
from harness.core.fsutil import atomic_write_bytes
from harness.core.registry import Registry
from pretrain.encoders.base import Encoder

#: The file a classifier-producing task writes into its stage directory.
CLASSIFIER_FILE = "classifier.pth"
#: Version of the file's layout.
CLASSIFIER_FORMAT = 1


class ClassifierError(UserError):
    """A saved classifier is missing or unreadable; the message names the stage and the fix."""


@dataclass
class SavedClassifier:
    """A classifier as saved by the task that trained it.

    Attributes:
        task: The task that trained it (its builder's registry name).
        classes: Class names of its train split, in label order.
        spec: What the builder needs besides the weights (pooling, blocks, preset, ...).
        state: The head's (or the whole model's) state dict.
    """

    task: str
    classes: list[str]
    spec: dict[str, Any]
    state: dict[str, torch.Tensor]


#: Builders by task name: ``(encoder, saved) -> module`` mapping images to logits.
ClassifierBuilder = Callable[[Encoder, SavedClassifier], nn.Module]
CLASSIFIERS: Registry[ClassifierBuilder] = Registry("classifier")


def register_classifier(task: str) -> Callable[[ClassifierBuilder], ClassifierBuilder]:
    """Decorator: register the builder of the classifiers task ``task`` saves."""

    def add(fn: ClassifierBuilder) -> ClassifierBuilder:
        CLASSIFIERS.register(task, fn)
        return fn

    return add


def save_classifier(out_dir: Path, saved: SavedClassifier) -> Path:
    """Write ``saved`` to ``out_dir/classifier.pth`` atomically; returns the path."""
    import io

    buf = io.BytesIO()
    torch.save({"format": CLASSIFIER_FORMAT, "task": saved.task, "classes": list(saved.classes),
                "spec": saved.spec,
                "state": {k: v.detach().cpu() for k, v in saved.state.items()}}, buf)  # fmt: skip
    path = Path(out_dir) / CLASSIFIER_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_classifier(stage_dir: Path, task: str) -> SavedClassifier:
    """The classifier task ``task`` saved in ``stage_dir``.

    Raises:
        ClassifierError: The file is missing (the stage failed, or ran before classifiers were
            saved) or was written by another task.
    """
    path = Path(stage_dir) / CLASSIFIER_FILE
    if not path.is_file():
        raise ClassifierError(
            f"no saved classifier of task '{task}' at {path}: that stage failed or ran before "
            f"tasks saved their classifier; delete its record (or the stage directory) so that "
            f"'{task}' runs again"
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != CLASSIFIER_FORMAT or blob.get("task") != task:
        raise ClassifierError(
            f"{path} holds a classifier of task '{blob.get('task')}' (format "
            f"{blob.get('format')}), not of '{task}' (format {CLASSIFIER_FORMAT}): re-run '{task}'"
        )
    return SavedClassifier(blob["task"], list(blob["classes"]), dict(blob["spec"]),
                           dict(blob["state"]))  # fmt: skip


def build_classifier(encoder: Encoder, saved: SavedClassifier) -> nn.Module:
    """The classifier ``saved`` describes on ``encoder`` (eval mode): images -> logits."""
    return CLASSIFIERS.get(saved.task)(encoder, saved).eval()
