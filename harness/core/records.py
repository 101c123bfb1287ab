"""Run records: the documented schema of one result, and the results store on disk.

One JSON file per (encoder, task, seed) run, named ``<run_id>.json``. A record holds what was
evaluated (encoder, recipe, task and its version), what came out (metrics, details), how it was
configured (resolved config and its hash, seed) and where it ran (provenance). Files are written
atomically, so many processes may write into one directory at once and a reader never sees a
partial record.

A run that is still going may be written with status ``"running"`` and later overwritten (same
``run_id``) with its final ``"ok"`` or ``"failed"`` record.

Paths in a record (the encoder's checkpoint, the stage and data directories in ``details``) are
stored absolute, so a report run from any directory finds them; a relative path in an older
record is resolved against the ``cwd`` of its provenance (:func:`resolve_recorded_path`).

A record file that cannot be read is never dropped silently: :func:`scan_records` returns it with
the reason, and :func:`announce_skipped` names it once per process on stderr.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
import traceback as traceback_module
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.core.fsutil import PathLike, atomic_write_json, config_hash

#: Version of the record schema written by this code. Bump it when a field changes meaning.
SCHEMA_VERSION = 1

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")
#: Byte strings that every record file contains; used to skip other JSON files cheaply.
_RECORD_MARKERS = (b'"schema_version"', b'"run_id"')
#: Keys of ``details`` that hold a path (made absolute when a record is written).
PATH_DETAILS = ("stage", "data_root", "mm_config", "work_dir")
#: Encoder sources whose ``checkpoint`` is a file path.
_FILE_SOURCES = ("pretrain", "checkpoint")
#: Prefix of a checkpoint that names timm weights rather than a file.
_TIMM_PREFIX = "timm:"


class RecordError(ValueError):
    """A record file is unreadable or does not match the schema; the message names the file.

    Attributes:
        path: The record file.
        reason: What is wrong with it, without the file name.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        super().__init__(f"invalid record {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


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


@dataclass(frozen=True)
class SkippedRecord:
    """A record file that could not be loaded, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class RecordScan(NamedTuple):
    """What :func:`scan_records` found: the valid records and the files it had to skip."""

    records: list[Record]
    skipped: list[SkippedRecord]


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
    Relative paths (see :func:`with_absolute_paths`) are written absolute; ``config`` and its
    hash are written as they are.

    Args:
        record: The record to write.
        directory: Results directory; created if missing.

    Returns:
        The path of the written file.
    """
    path = record_path(record.run_id, directory)
    record = with_absolute_paths(record)
    # Through pydantic's JSON encoder so non-finite floats become "NaN" strings (standard JSON).
    atomic_write_json(path, json.loads(record.model_dump_json()))
    return path


def with_absolute_paths(record: Record) -> Record:
    """The record with its file paths made absolute: the encoder's checkpoint (for pretrained
    and checkpoint encoders) and the :data:`PATH_DETAILS` keys of ``details``.

    A relative path is taken relative to the record's provenance ``cwd`` when it has one, else
    to this process's working directory (the directory the run was started from). ``config``
    is left alone, so the record's config hash and run key do not change.

    Args:
        record: A record, e.g. one about to be written.
    """
    base = Path(str(record.provenance.get("cwd") or os.getcwd()))
    update: dict[str, Any] = {}
    checkpoint = record.encoder.checkpoint
    if (
        checkpoint
        and record.encoder.source in _FILE_SOURCES
        and not checkpoint.startswith(_TIMM_PREFIX)
        and _relative(checkpoint)
    ):
        absolute = str((base / checkpoint).resolve())
        update["encoder"] = record.encoder.model_copy(update={"checkpoint": absolute})
    details = {
        key: str((base / value).resolve())
        for key, value in record.details.items()
        if key in PATH_DETAILS and isinstance(value, str) and _relative(value)
    }
    if details:
        update["details"] = {**record.details, **details}
    return record.model_copy(update=update) if update else record


def _relative(path: str) -> bool:
    """Whether ``path`` is a non-empty relative path."""
    return bool(path) and not Path(path).is_absolute()


def resolve_recorded_path(record: Record, value: str, records_dir: PathLike | None) -> Path | None:
    """Where a path stored in ``record`` points, independent of the reader's directory.

    An absolute path is returned as it is. A relative one (records written before paths were
    stored absolute) is resolved against the ``cwd`` in the record's provenance; without one,
    against the parent of ``records_dir`` (the suite directory), trying the path's trailing
    parts there (``runs/demo/pretrain/x`` -> ``<suite>/pretrain/x``). Never against the
    current working directory, which may hold another run's files of the same name.

    Args:
        record: The record holding the path.
        value: The stored path.
        records_dir: The records directory the record was read from, if known.

    Returns:
        The path, or ``None`` when a relative path cannot be placed or does not exist.
    """
    path = Path(value)
    if path.is_absolute():
        return path
    cwd = record.provenance.get("cwd")
    if cwd:
        return Path(str(cwd)) / path
    if records_dir is None:
        return None
    base = Path(records_dir).resolve().parent
    for start in range(len(path.parts)):
        candidate = base.joinpath(*path.parts[start:])
        if candidate.exists():
            return candidate
    return None


def load_record(path: PathLike) -> Record:
    """Reads and validates one record file.

    Args:
        path: A ``.json`` record file.

    Raises:
        RecordError: If the file cannot be read, is not JSON, or does not match the schema.
    """
    return _validate(_read_json(Path(path)), Path(path))


def scan_records(directory: PathLike, strict: bool = False) -> RecordScan:
    """Loads every record under ``directory`` (recursively, sorted by path), keeping the files
    that could not be loaded with the reason.

    JSON files that parse but lack top-level ``schema_version`` and ``run_id`` keys are not
    records and are ignored. A ``.json`` file that does not parse (e.g. a record cut short) or a
    record that does not validate is skipped and listed, never dropped without a word.

    Args:
        directory: Results directory.
        strict: Raise on the first invalid record instead of listing it.

    Raises:
        RecordError: In strict mode, for an invalid record file.
        FileNotFoundError: If ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"records directory does not exist: {root}")
    scan = RecordScan([], [])
    for path in sorted(root.glob("**/*.json")):
        try:
            record = _load_if_record(path)
        except RecordError as exc:
            if strict:
                raise
            scan.skipped.append(SkippedRecord(path, exc.reason))
            continue
        if record is not None:
            scan.records.append(record)
    return scan


def load_records(directory: PathLike, strict: bool = False) -> list[Record]:
    """Loads every record under ``directory`` (recursively), sorted by path.

    Files that are not records are ignored; record files that cannot be loaded are skipped and
    named on stderr (once per process, see :func:`announce_skipped`), or raise when ``strict``.
    Use :func:`scan_records` to get the skipped files themselves.

    Args:
        directory: Results directory.
        strict: Raise on the first invalid record instead of skipping it.

    Raises:
        RecordError: In strict mode, for an invalid record file.
        FileNotFoundError: If ``directory`` does not exist.
    """
    scan = scan_records(directory, strict)
    announce_skipped(scan.skipped)
    return scan.records


_ANNOUNCED: set[tuple[str, str]] = set()


def announce_skipped(skipped: list[SkippedRecord], stream: TextIO | None = None) -> None:
    """Names each skipped record file on stderr as ``mimbench: warning: skipped record FILE:
    REASON``, once per process however often the records are loaded.

    Args:
        skipped: Skipped files, e.g. :attr:`RecordScan.skipped`.
        stream: Where the lines go (default: ``sys.stderr``).
    """
    out = stream or sys.stderr
    for item in skipped:
        key = (str(item.path.resolve()), item.reason)
        if key in _ANNOUNCED:
            continue
        _ANNOUNCED.add(key)
        print(f"mimbench: warning: skipped record {item}", file=out, flush=True)


def record_json_schema() -> dict[str, Any]:
    """Returns the JSON schema of :class:`Record` (for documentation)."""
    return Record.model_json_schema()


def _load_if_record(path: Path) -> Record | None:
    """Loads ``path`` if it is a record; ``None`` for other JSON files.

    A file without the record markers is parsed only to tell a record cut short (or any file
    that is not JSON) from a JSON file of another kind.
    """
    raw = _read_bytes(path)
    data = _parse_json(raw, path)
    if not all(marker in raw for marker in _RECORD_MARKERS):
        return None
    if not isinstance(data, dict) or "schema_version" not in data or "run_id" not in data:
        return None
    return _validate(data, path)


def _read_bytes(path: Path) -> bytes:
    """The bytes of a file, raising :class:`RecordError` that names it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RecordError(path, f"cannot read: {exc}") from exc


def _read_json(path: Path) -> Any:
    """Reads a JSON file, raising :class:`RecordError` that names it."""
    return _parse_json(_read_bytes(path), path)


def _parse_json(raw: bytes, path: Path) -> Any:
    """Parses JSON bytes, raising :class:`RecordError` that names ``path``."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        hint = " (the file is empty)" if not raw.strip() else " (cut short?)"
        raise RecordError(path, f"not valid JSON{hint}: {exc}") from exc


def _validate(data: Any, path: Path) -> Record:
    """Validates parsed JSON as a record, raising :class:`RecordError` that names ``path``."""
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'record'}: {err['msg']}"
            for err in exc.errors()
        )
        raise RecordError(path, f"does not match the record schema: {problems}") from exc


def row_key(info: SweepInfo | None) -> tuple[str, str] | None:
    """What tells the records of one sweep row from another's (None outside sweeps): part of a
    run's key for the runner (what is done) and for the reports (what is a duplicate)."""
    if info is None:
        return None
    return info.name, json.dumps(info.tags, sort_keys=True)
