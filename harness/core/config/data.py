"""Where images come from: the ``data`` block of suites and pretraining configs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

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
    any other value is a path to an ImageFolder root holding ``train/`` and ``val/``, or to a
    shard dataset (``mimbench data shard``'s output: WebDataset tar shards and a manifest).
    """

    source: str = "shapes"
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)
    num_workers: int = Field(0, ge=0)
    eval_crop_pct: float = Field(0.875, gt=0, le=1.0)
    #: Unreadable image files are fatal in every stage reading this data (pretraining and the
    #: tasks; a task's own ``strict_data`` also makes them fatal for that task). Default: skipped,
    #: counted and named on the log.
    strict_data: bool = False
    #: The layout of ``source``: ``auto`` (default) reads shards where a shard manifest is found
    #: (``manifest.json`` with ``format: mimbench-shards``) and an ImageFolder otherwise; the
    #: other two insist on one (an error names the mismatch).
    layout: Literal["auto", "imagefolder", "shards"] = "auto"
    #: Pretraining's crops through the fast decode path (:mod:`harness.core.data.fastdecode`:
    #: JPEGs decoded at reduced size where the crop is downscaled anyway, else straight to
    #: uint8 tensors resized by torch, uint8 batches normalised on the device). Off by default:
    #: the pixels differ slightly from the slow path's, so it is part of the run's config.
    fast_decode: bool = False
    #: Pretraining reads its shards as a stream (:class:`~harness.core.data.shards.ShardStream`:
    #: seeded shard order split over ranks and loader workers, a shuffle buffer, exact resume
    #: mid-epoch) instead of by random access in the seeded global order. Shards only; the
    #: tasks read them by random access either way. The order depends on the number of ranks
    #: and loader workers: a resume with other numbers is refused (the checkpoint keeps them).
    stream: bool = False
    #: The stream's shuffle buffer in samples (WebDataset's ``shuffle(n)``; 0: shard order).
    shuffle_buffer: int = Field(1000, ge=0)

    @model_validator(mode="after")
    def _check_stream(self) -> DataConfig:
        if self.stream and (self.source == "shapes" or self.layout == "imagefolder"):
            what = "'shapes' (an ImageFolder)" if self.source == "shapes" else "an ImageFolder"
            raise ValueError(
                f"data.stream reads a shard dataset, but data.source is {what}: write its shards "
                "with `mimbench data shard IMAGEFOLDER --out DIR` and set data.source to DIR, "
                "or set data.stream: false"
            )
        if self.shuffle_buffer != 1000 and not self.stream:
            raise ValueError(
                "data.shuffle_buffer is the stream's: set data.stream: true (shards), or leave it out"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_default_strict(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # added after records and pretraining stages were hashed: left out of every dump at
        # their defaults so their config hashes (which dump the whole data config) stay the same
        out = handler(self)
        for key, default in self._LATE_DEFAULTS.items():
            if getattr(self, key) == default:
                out.pop(key, None)
        return out

    #: Keys added after configs were hashed, with the default that leaves them out of dumps.
    _LATE_DEFAULTS: ClassVar[dict[str, Any]] = {
        "strict_data": False, "layout": "auto", "fast_decode": False, "stream": False,
        "shuffle_buffer": 1000,
    }

