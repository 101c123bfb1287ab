"""Run records: the documented schema of one result, and the results store on disk.

One JSON file per (encoder, task, seed) run, named ``<run_id>.json``. A record holds what was
evaluated (encoder, recipe, task and its version), what came out (metrics, details), how it was
configured (resolved config and its hash, seed) and where it ran (provenance). Files are written
atomically, so many processes may write into one directory at once and a reader never sees a
partial record.

A run that is still going may be written with status ``"running"`` and later overwritten (same
``run_id``) with its final ``"ok"`` or ``"failed"`` record.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import traceback as traceback_module
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.fsutil import PathLike, atomic_write_json, config_hash

#: Version of the record schema written by this code. Bump it when a field changes meaning.
SCHEMA_VERSION = 1

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
#: Byte strings that every record file contains; used to skip other JSON files cheaply.
_RECORD_MARKERS = (b'"schema_version"', b'"run_id"')


class RecordError(ValueError):
    """A record file is unreadable or does not match the schema; the message names the file."""


class _Strict(BaseModel):
    """Base for record parts: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


class EncoderInfo(_Strict):
    """The encoder that was evaluated."""

    name: str = Field(description="Encoder name as it appears in tables (unique per sweep point).")
    arch: str = Field(description="Backbone architecture, e.g. a timm model name.")
    source: Literal["pretrain", "random", "checkpoint", "timm"] = Field(
        description="Where the weights came from: a mimbench pretraining run, random "
        "initialization, a user checkpoint, or timm pretrained weights."
    )
    checkpoint: str | None = Field(default=None, description="Path of the weights file, if any.")
    sha256: str | None = Field(default=None, description="SHA-256 of the weights file, if any.")


class TaskInfo(_Strict):
    """The evaluation protocol and its version."""

    name: str = Field(description="Task name, e.g. 'linear_probe'.")
    version: int = Field(
        ge=0, description="Protocol version; bumped whenever the protocol changes."
    )


class MetricInfo(_Strict):
    """How to read one metric."""

    higher_is_better: bool = Field(description="Whether larger values are better.")
    unit: str | None = Field(default=None, description="Unit, e.g. '%' or 'AP'.")


class ErrorInfo(_Strict):
    """Why a run failed."""

    type: str = Field(description="Exception class name.")
    message: str = Field(description="Exception message.")
    traceback: str | None = Field(default=None, description="Formatted traceback.")

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """Builds the error part of a failed record from an exception.

        Args:
            exc: The exception that ended the run.
        """
        formatted = "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type=type(exc).__name__, message=str(exc), traceback=formatted)


class SweepInfo(_Strict):
    """Which row of which sweep (ablation table) a run belongs to (see :mod:`harness.sweep`).

    The ablation report (:mod:`harness.ablation`) rebuilds the table from these fields alone:
    rows are ordered by ``row`` and labelled by ``tags``.
    """

    name: str = Field(description="Sweep name (the sweep block's 'name', else the suite's).")
    table: str | None = Field(
        default=None, description="The published table it reproduces, e.g. 'MAE Table 1a'."
    )
    mode: Literal["grid", "zip"] = Field(default="grid", description="How the axes combine.")
    axes: list[str] = Field(
        default_factory=list, description="Tag names of the axes, in the sweep's order."
    )
    row: int = Field(ge=0, description="0-based position of the row in the sweep's expansion.")
    rows: int = Field(ge=1, description="Number of rows of the sweep.")
    tags: dict[str, Any] = Field(
        default_factory=dict, description="Axis tag name -> the row's value (JSON), axis order."
    )


class Record(_Strict):
    """One run of one task on one encoder with one seed.

    Timestamps are ISO-8601 strings in UTC (see :func:`utc_now`). ``config_hash`` is filled in
    from ``config`` when left empty. Non-finite metric values are allowed only in failed records
    (they are stored as the strings ``"NaN"``/``"Infinity"`` so the file stays standard JSON).
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    schema_version: int = Field(default=SCHEMA_VERSION, description="Record schema version.")
    run_id: str = Field(description="Unique id; also the file name stem. See new_run_id().")
    status: Literal["ok", "failed", "running"]
    started_at: str = Field(description="ISO-8601 UTC start time.")
    finished_at: str | None = Field(default=None, description="ISO-8601 UTC end time.")
    duration_s: float | None = Field(default=None, ge=0, description="Wall-clock seconds.")
    encoder: EncoderInfo
    recipe: dict[str, Any] | None = Field(
        default=None,
        description="Resolved pretraining recipe that produced the encoder; None for random "
        "or imported weights.",
    )
    task: TaskInfo
    metrics: dict[str, float] = Field(default_factory=dict, description="Metric name -> value.")
    metric_info: dict[str, MetricInfo] = Field(
        default_factory=dict, description="Metric name -> how to read it; covers every metric."
    )
    details: dict[str, Any] = Field(
        default_factory=dict, description="Free-form task outputs, e.g. which probe head won."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Resolved run config.")
    config_hash: str = Field(default="", description="config_hash(config); filled in if empty.")
    seed: int
    suite: str | None = Field(default=None, description="Suite the run belongs to, if any.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Free labels, e.g. sweep axis values."
    )
    sweep: SweepInfo | None = Field(
        default=None, description="The sweep row this run belongs to; None outside sweeps."
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="collect_provenance(): git, packages, hardware."
    )
    error: ErrorInfo | None = Field(default=None, description="Set exactly for failed runs.")

    @field_validator("schema_version")
    @classmethod
    def _known_schema_version(cls, value: int) -> int:
        if not 1 <= value <= SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {value} is not supported (this mimbench reads 1..{SCHEMA_VERSION});"
                " upgrade mimbench to read records written by a newer version"
            )
        return value

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str) -> str:
        if not _RUN_ID_PATTERN.match(value):
            raise ValueError(
                f"run_id {value!r} must start with a letter or digit and contain only "
                "letters, digits and . _ + - (it is used as a file name)"
            )
        return value

    @field_validator("started_at", "finished_at")
    @classmethod
    def _iso_timestamp(cls, value: str | None) -> str | None:
        if value is not None:
            parse_timestamp(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Record:
        self._check_metric_info()
        self._check_status()
        if not self.config_hash:
            self.config_hash = config_hash(self.config)
        return self

    def _check_metric_info(self) -> None:
        missing = sorted(set(self.metrics) - set(self.metric_info))
        if missing:
            raise ValueError(f"metrics without a metric_info entry: {', '.join(missing)}")

    def _check_status(self) -> None:
        if self.status == "failed":
            if self.error is None:
                raise ValueError("a failed record needs 'error'")
            return
        if self.error is not None:
            raise ValueError(f"a record with status {self.status!r} must not have 'error'")
        if self.status == "ok" and not self.metrics:
            raise ValueError("an ok record needs at least one metric")
        bad = sorted(name for name, value in self.metrics.items() if not math.isfinite(value))
        if bad:
            raise ValueError(
                f"non-finite metric values in a {self.status!r} record: {', '.join(bad)} "
                "(only failed records may hold NaN/inf)"
            )


def utc_now() -> str:
    """Returns the current time as an ISO-8601 UTC string, e.g. ``2025-01-31T12:00:00.000000+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_timestamp(value: str) -> datetime:
    """Parses an ISO-8601 timestamp (a trailing ``Z`` is accepted) into an aware datetime.

    Naive timestamps are taken to be UTC.

    Args:
        value: The timestamp string.

    Raises:
        ValueError: If ``value`` is not ISO-8601.
    """
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def new_run_id(prefix: str) -> str:
    """Returns a readable, unique run id: ``<prefix>-<UTC yyyymmddThhmmssZ>-<6 hex>``.

    Characters of ``prefix`` that are unsafe in file names (e.g. ``/``) become ``-``.

    Args:
        prefix: Human-readable start, e.g. ``"mae_vitb-linear_probe-s0"``.
    """
    safe = _UNSAFE_ID_CHARS.sub("-", prefix).strip("-._+") or "run"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def record_path(run_id: str, directory: PathLike) -> Path:
    """Returns where :func:`write_record` puts the record with ``run_id``."""
    return Path(directory) / f"{run_id}.json"


def write_record(record: Record, directory: PathLike) -> Path:
    """Writes a record atomically as ``<directory>/<run_id>.json``.

    An existing record with the same ``run_id`` (e.g. its ``"running"`` version) is replaced.

    Args:
        record: The record to write.
        directory: Results directory; created if missing.

    Returns:
        The path of the written file.
    """
    path = record_path(record.run_id, directory)
    # Through pydantic's JSON encoder so non-finite floats become "NaN" strings (standard JSON).
    atomic_write_json(path, json.loads(record.model_dump_json()))
    return path


def load_record(path: PathLike) -> Record:
    """Reads and validates one record file.

    Args:
        path: A ``.json`` record file.

    Raises:
        RecordError: If the file cannot be read, is not JSON, or does not match the schema.
    """
    return _validate(_read_json(Path(path)), Path(path))


def load_records(directory: PathLike, strict: bool = False) -> list[Record]:
    """Loads every record under ``directory`` (recursively), sorted by path.

    JSON files without top-level ``schema_version`` and ``run_id`` keys are not records and are
    ignored. Record files that fail to parse or validate are skipped with a warning naming the
    file, or raise when ``strict``.

    Args:
        directory: Results directory.
        strict: Raise on the first invalid record instead of warning.

    Raises:
        RecordError: In strict mode, for an invalid record file.
        FileNotFoundError: If ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"records directory does not exist: {root}")
    records: list[Record] = []
    for path in sorted(root.glob("**/*.json")):
        try:
            record = _load_if_record(path)
        except RecordError as exc:
            if strict:
                raise
            warnings.warn(f"skipping {exc}", stacklevel=2)
            continue
        if record is not None:
            records.append(record)
    return records


def record_json_schema() -> dict[str, Any]:
    """Returns the JSON schema of :class:`Record` (for documentation)."""
    return Record.model_json_schema()


def _load_if_record(path: Path) -> Record | None:
    """Loads ``path`` if it looks like a record; ``None`` for other JSON files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"invalid record {path}: cannot read: {exc}") from exc
    if not all(marker in raw for marker in _RECORD_MARKERS):
        return None
    data = _parse_json(raw, path)
    if not isinstance(data, dict) or "schema_version" not in data or "run_id" not in data:
        return None
    return _validate(data, path)


def _read_json(path: Path) -> Any:
    """Reads a JSON file, raising :class:`RecordError` that names it."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordError(f"invalid record {path}: cannot read: {exc}") from exc
    return _parse_json(raw, path)


def _parse_json(raw: bytes, path: Path) -> Any:
    """Parses JSON bytes, raising :class:`RecordError` that names ``path``."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"invalid record {path}: not valid JSON: {exc}") from exc


def _validate(data: Any, path: Path) -> Record:
    """Validates parsed JSON as a record, raising :class:`RecordError` that names ``path``."""
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        raise RecordError(f"invalid record {path}: {exc}") from exc
