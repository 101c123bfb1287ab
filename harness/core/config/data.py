"""Where images come from: the ``data`` block of suites and pretraining configs."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from harness.core.config.base import StrictModel


class ShapesConfig(StrictModel):
    """Parameters of the embedded synthetic dataset (see :mod:`harness.core.data.shapes`)."""

    image_size: int = Field(32, ge=8)
    train_per_class: int = Field(100, ge=2)
    val_per_class: int = Field(25, ge=1)
    scene_size: int = Field(128, ge=32)
    train_scenes: int = Field(48, ge=1)
    val_scenes: int = Field(16, ge=1)
    max_objects: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)


class DataConfig(StrictModel):
    """Where images come from.

    ``source: shapes`` generates the embedded synthetic dataset on demand into a cache;
    any other value is a path to an ImageFolder root holding ``train/`` and ``val/``.
    """

    source: str = "shapes"
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)
    num_workers: int = Field(0, ge=0)
    eval_crop_pct: float = Field(0.875, gt=0, le=1.0)
    #: Unreadable image files are fatal in every stage reading this data (pretraining and the
    #: tasks; a task's own ``strict_data`` also makes them fatal for that task). Default: skipped,
    #: counted and named on the log.
    strict_data: bool = False

    @model_serializer(mode="wrap")
    def _omit_default_strict(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and pretraining stages were hashed: left out of every dump at its
        # default so their config hashes (which dump the whole data config) stay the same
        out = handler(self)
        if not self.strict_data:
            out.pop("strict_data", None)
        return out

