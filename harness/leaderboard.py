"""Collation of run records into a leaderboard (the table model the report formats).

Records are first reduced to the ones that count: ``running`` records are ignored, only the
newest version of each task is used (older versions are never mixed in silently: a note says
so), and of several records of the same run (same run key: config hash and sweep row, as the
runner uses to skip finished runs) the newest ok one wins. The ok runs are then averaged over
seeds; failed runs are kept visible, never dropped.

A leaderboard row is one encoder of one suite on one dataset: records of different suites, of
different data, or of different encoders that share a name (two checkpoints both called
``encoder``) are different rows, never merged. The tables say each row's suite and data (once
under the table when every row shares them), and equal names of different encoders are told
apart (``encoder [1a2b3c4d]`` by checkpoint sha256, else ``encoder (2)``) with a note.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from harness.core.errors import UserError
from harness.core.records import Record, parse_timestamp, row_key

#: Long-form columns of :func:`records_to_frame`, before the ``tag.<k>`` columns.
FRAME_COLUMNS: tuple[str, ...] = (
    "encoder",
    "encoder_source",
    "task",
    "task_version",
    "metric",
    "value",
    "higher_is_better",
    "seed",
    "status",
    "run_id",
    "suite",
    "finished_at",
)

#: Marker appended to a cell whose mean is over the ok seeds while other seeds failed.
PARTIAL_FAILURE_MARK = "†"

#: Marker appended to a cell where a run's winning probe head lay on an edge of its grid (the
#: record's ``details.grid_edge``, :func:`downstream.linear_probe.grid_edges`).
GRID_EDGE_MARK = "‡"

#: Units of the metrics our tasks report, for records whose metric_info names none: accuracies
#: and mIoU are percentages, COCO AP is on its 0-100 scale.
DEFAULT_UNITS: dict[str, str] = {
    "top1": "%",
    "top5": "%",
    "miou": "%",
    "aacc": "%",
    "rmse": "m",
    "delta1": "%",
    "delta2": "%",
    "delta3": "%",
    "box_ap": "AP",
    "mask_ap": "AP",
}


class ReportError(UserError, ValueError):
    """Nothing to report, or the records cannot be collated."""


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class RowInfo:
    """Where a leaderboard row comes from.

    Attributes:
        encoder: The encoder's name as shown (told apart when different encoders share one).
        suite: The suite of its records ("" when the records name none).
        data: The dataset, short: ``shapes`` or the last part of the ImageFolder path ("" when
            the records do not say).
    """

    encoder: str
    suite: str
    data: str


@dataclass
class Leaderboard:
    """Encoders (rows) by ``task/metric`` columns, averaged over seeds of ok runs.

    The frames are indexed by a unique row label (:attr:`encoders`): the encoder's shown name,
    with its suite and data added only where the same name is a row of several suites or data.

    Attributes:
        mean: Mean over seeds; NaN where no ok run exists.
        std: Sample standard deviation over seeds (ddof=1); NaN where n < 2.
        n: Number of ok runs (seeds) behind each cell.
        failed: True where at least one counted run of the cell's (encoder, task) failed.
        higher_is_better: Direction of each column.
        notes: What the reader must know (older task versions ignored, duplicates dropped, ...).
        rows: Row label -> where the row comes from (encoder, suite, data).
        units: Column -> unit of its values (None where unknown).
        row_of: ``run_id`` of each counted record -> its row label.
        grid_edge: ``(row label, column)`` -> the edge messages of the cell's ok runs whose
            winning head lay on an edge of the task's grid (``details.grid_edge``).
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: pd.DataFrame
    higher_is_better: dict[str, bool]
    notes: list[str] = field(default_factory=list)
    rows: dict[str, RowInfo] = field(default_factory=dict)
    units: dict[str, str | None] = field(default_factory=dict)
    row_of: dict[str, str] = field(default_factory=dict)
    grid_edge: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def on_grid_edge(self, label: str, column: str) -> bool:
        """Whether a counted run of the cell chose a head on an edge of its grid."""
        return bool(self.grid_edge.get((label, column)))

    @property
    def columns(self) -> list[str]:
        """The ``task/metric`` columns, in table order."""
        return [str(c) for c in self.mean.columns]

    @property
    def encoders(self) -> list[str]:
        """The encoder rows, in table order."""
        return [str(i) for i in self.mean.index]

    def best(self, column: str) -> set[str]:
        """Returns the encoders with the best mean in ``column`` (ties all count)."""
        values = self.mean[column].dropna()
        if values.empty:
            return set()
        target = values.max() if self.higher_is_better.get(column, True) else values.min()
        return {str(enc) for enc, value in values.items() if value == target}

    def row(self, label: str) -> RowInfo:
        """Where the row ``label`` comes from (the label itself when unknown)."""
        return self.rows.get(label, RowInfo(encoder=label, suite="", data=""))

    def varying(self) -> tuple[bool, bool]:
        """Whether the rows differ in suite, and whether they differ in data (then the tables
        show a suite / data column; otherwise they say it once, see :meth:`origin`)."""
        infos = [self.row(label) for label in self.encoders]
        return len({i.suite for i in infos}) > 1, len({i.data for i in infos}) > 1

    def origin(self) -> str | None:
        """``suite X, data Y`` that every row shares, for one line beside the table; ``None``
        when there are no rows or nothing shared is known."""
        infos = [self.row(label) for label in self.encoders]
        if not infos:
            return None
        several_suites, several_data = self.varying()
        parts = []
        if not several_suites and infos[0].suite:
            parts.append(f"suite {infos[0].suite}")
        if not several_data and infos[0].data:
            parts.append(f"data {infos[0].data}")
        return ", ".join(parts) or None

    def header(self, column: str) -> str:
        """A column's name with its unit, e.g. ``linear_probe/top1 (%)``."""
        unit = self.units.get(column)
        return f"{column} ({unit})" if unit else column


# --------------------------------------------------------------------------- long-form frame


def records_to_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Flattens records into one row per (record, metric).

    Failed records contribute a single row whose ``metric`` and ``value`` are missing (NaN)
    and whose ``status`` is ``"failed"``, so they are not silently dropped. ``running``
    records are skipped. Tags become ``tag.<key>`` columns.

    Args:
        records: Run records.

    Returns:
        A long-form DataFrame with :data:`FRAME_COLUMNS` plus the tag columns.
    """
    rows: list[dict[str, Any]] = []
    for record in records:
        rows.extend(_record_rows(record))
    frame = pd.DataFrame(rows)
    for column in FRAME_COLUMNS:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    tag_columns = sorted(c for c in frame.columns if c.startswith("tag."))
    return frame[[*FRAME_COLUMNS, *tag_columns]]


def _record_rows(record: Record) -> list[dict[str, Any]]:
    """The long-form rows of one record."""
    if record.status == "running":
        return []
    base: dict[str, Any] = {
        "encoder": record.encoder.name,
        "encoder_source": record.encoder.source,
        "task": record.task.name,
        "task_version": record.task.version,
        "seed": record.seed,
        "status": record.status,
        "run_id": record.run_id,
        "suite": record.suite,
        "finished_at": record.finished_at,
        **{f"tag.{key}": value for key, value in record.tags.items()},
    }
    if record.status == "failed":
        return [{**base, "metric": math.nan, "value": math.nan, "higher_is_better": math.nan}]
    return [
        {
            **base,
            "metric": name,
            "value": float(value),
            "higher_is_better": record.metric_info[name].higher_is_better,
        }
        for name, value in record.metrics.items()
    ]


# --------------------------------------------------------------------------- record selection


def newest_task_versions(records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """Keeps only records of the newest version of each task.

    Args:
        records: Run records.

    Returns:
        The kept records and a note per task where older versions were ignored.
    """
    versions: dict[str, set[int]] = defaultdict(set)
    for record in records:
        versions[record.task.name].add(record.task.version)
    newest = {task: max(found) for task, found in versions.items()}
    notes = []
    for task in sorted(versions):
        older = sorted(versions[task] - {newest[task]})
        if older:
            dropped = sum(r.task.name == task and r.task.version != newest[task] for r in records)
            listed = ", ".join(f"v{v}" for v in older)
            notes.append(
                f"{task}: only version v{newest[task]} is reported; {dropped} record(s) of "
                f"older version(s) {listed} were ignored."
            )
    kept = [r for r in records if r.task.version == newest[r.task.name]]
    return kept, notes


def deduplicate(records: Sequence[Record]) -> tuple[list[Record], list[str]]:
    """Keeps one record per run: the newest ok one, else the newest failed one.

    Records are the same run when their run keys are equal (see :func:`run_key`); records of
    different suites, data, encoders or sweep rows are never duplicates of each other. "Newest"
    is by ``finished_at`` (``started_at`` when unfinished), then ``run_id``. An ok result wins
    over a failure of the same run, as the runner counts a run with an ok record as done.

    Args:
        records: Run records.

    Returns:
        The kept records (in input order) and a note when duplicates were dropped.
    """
    best: dict[tuple[Any, ...], Record] = {}
    for record in records:
        key = run_key(record)
        current = best.get(key)
        if current is None or _preference(record) > _preference(current):
            best[key] = record
    keep = {id(r) for r in best.values()}
    kept = [r for r in records if id(r) in keep]
    dropped = len(records) - len(kept)
    notes = []
    if dropped:
        notes.append(
            f"{dropped} duplicate record(s) of the same run (same config hash and sweep row) "
            "were ignored; the newest ok record of each run is reported."
        )
    return kept, notes


def run_key(record: Record) -> tuple[Any, ...]:
    """What makes two records the same run: the run key the runner skips finished runs by
    (config hash and sweep row, :func:`harness.core.records.row_key`), with the encoder name, task,
    task version and seed (implied by the config of real records; they keep records without a
    config apart) and, for a checkpoint encoder, the checkpoint's sha256 (other weights under
    the same path are another run).
    """
    sha = record.encoder.sha256 if record.encoder.source == "checkpoint" else None
    return (
        record.config_hash,
        row_key(record.sweep),
        record.encoder.name,
        record.task.name,
        record.task.version,
        record.seed,
        sha,
    )


def _preference(record: Record) -> tuple[bool, datetime, str]:
    """Sort key among records of one run: ok before failed, then the newest."""
    return (record.status == "ok", *_recency(record))


def _recency(record: Record) -> tuple[datetime, str]:
    """Sort key: when the record finished (or started), then its run id."""
    stamp = record.finished_at or record.started_at
    try:
        when = parse_timestamp(stamp)
    except ValueError:
        when = _EPOCH
    return when, record.run_id


# --------------------------------------------------------------------------- leaderboard


def leaderboard(records: Iterable[Record], metrics: list[str] | None = None) -> Leaderboard:
    """Builds the leaderboard: encoders by ``task/metric``, averaged over seeds of ok runs.

    Args:
        records: Run records (``running`` ones are ignored).
        metrics: Columns to report, each ``"task/metric"`` or a bare metric name (matching it in
            every task), in the order wanted; all columns, sorted, when ``None``.

    Returns:
        The :class:`Leaderboard`.
    """
    finished = [r for r in records if r.status != "running"]
    current, version_notes = newest_task_versions(finished)
    kept, duplicate_notes = deduplicate(current)
    notes = [*version_notes, *duplicate_notes]

    row_of, rows, row_notes = assign_rows(kept)
    notes.extend(row_notes)
    ok = [r for r in kept if r.status == "ok"]
    failed = [r for r in kept if r.status == "failed"]
    # Columns come from every record of the current task versions, so a cell whose newest run
    # failed still shows under the metrics its task reports.
    directions, direction_notes = _directions(current)
    notes.extend(direction_notes)

    columns = _select_columns(_all_columns(current, directions), metrics)
    labels = sorted(rows)
    mean, std, n = _aggregate(ok, row_of, labels, columns)
    failed_frame = _failed_cells(failed, row_of, labels, columns)
    if failed_frame.to_numpy().any() and (n.to_numpy() > 0)[failed_frame.to_numpy()].any():
        notes.append(
            f"{PARTIAL_FAILURE_MARK}: some seeds of this cell failed; the value is over the ok "
            "seeds only."
        )
    ranked = _ranked_columns(ok, columns, metrics)
    for column, sources in ranked.items():  # mean rank over datasets (the transfer suite)
        mean[column] = mean_rank(mean[sources], directions.get(sources[0], True))
        std[column] = math.nan
        n[column] = n[sources].min(axis=1)
        failed_frame[column] = failed_frame[sources].any(axis=1)
        directions[column] = False
    columns = [*columns, *ranked]
    edges = _grid_edges(ok, row_of, columns)
    notes.extend(_grid_edge_notes(edges))
    higher = {c: directions.get(c, True) for c in columns}
    return Leaderboard(
        mean=mean, std=std, n=n, failed=failed_frame, higher_is_better=higher, notes=notes,
        rows=rows, units=_units(current, columns), row_of=row_of, grid_edge=edges,
    )


def mean_rank(table: pd.DataFrame, higher_is_better: bool = True) -> pd.Series:
    """Per row, its rank among the rows in each column (1 = best; ties share the average rank;
    rows without a value are not ranked), averaged over the columns it has a value in."""
    ranks = table.rank(axis=0, ascending=not higher_is_better, method="average")
    return ranks.mean(axis=1, skipna=True)


def _ranked_columns(
    ok: Sequence[Record], columns: list[str], wanted: list[str] | None
) -> dict[str, list[str]]:
    """``task/rank_...`` column -> the ``task/metric`` columns it ranks over, from the records'
    ``details.ranked`` (``{rank metric: [metric, ...]}``), where every source column is shown
    and the rank column is wanted."""
    found: dict[str, list[str]] = {}
    for record in ok:
        for rank_metric, sources in (record.details.get("ranked") or {}).items():
            cols = [_column(record.task.name, m) for m in sources]
            if cols and all(c in columns for c in cols):
                found.setdefault(_column(record.task.name, rank_metric), cols)
    keep = _select_columns(sorted(found), wanted) if wanted is not None else sorted(found)
    return {c: found[c] for c in keep}


def _grid_edges(
    ok: Sequence[Record], row_of: dict[str, str], columns: list[str]
) -> dict[tuple[str, str], list[str]]:
    """``(row, column)`` -> the distinct edge messages of its ok records (seed order)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for record in sorted(ok, key=lambda r: r.seed):
        found = record.details.get("grid_edge") or []
        messages = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in found]
        for column in columns:
            if messages and column.split("/", 1)[0] == record.task.name:
                cell = edges.setdefault((row_of[record.run_id], column), [])
                cell.extend(m for m in messages if m not in cell)
    return edges


def _grid_edge_notes(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The footnote of :data:`GRID_EDGE_MARK`: what it means, then each row and task's edges."""
    if not edges:
        return []
    notes = [f"{GRID_EDGE_MARK}: the winning head lay on an edge of the task's hyperparameter "
             "grid in at least one seed; the grid may be too narrow (the record's "
             "details.grid_edge)."]
    seen: set[tuple[str, str]] = set()
    for (label, column), messages in edges.items():
        task = column.split("/", 1)[0]
        if (label, task) not in seen:
            seen.add((label, task))
            notes.append(f"{GRID_EDGE_MARK} {label} / {task}: {'; '.join(messages)}.")
    return notes


# --------------------------------------------------------------------------- rows


def assign_rows(
    records: Sequence[Record],
) -> tuple[dict[str, str], dict[str, RowInfo], list[str]]:
    """Groups records into leaderboard rows: one per (suite, data, encoder), where encoders
    with equal names but different weights or configs are different rows.

    Args:
        records: The records that count (one per run).

    Returns:
        ``run_id`` -> row label, row label -> :class:`RowInfo`, and a note per name that
        several different encoders share.
    """
    labels_of_data = data_labels([data_key(r) for r in records])
    by_row: dict[tuple[str, str, str, str], list[Record]] = defaultdict(list)
    for record in sorted(records, key=_recency):
        by_row[_row_identity(record)].append(record)
    shown, notes = _shown_names(by_row)
    label_count: dict[str, int] = defaultdict(int)
    for name in shown.values():
        label_count[name] += 1
    row_of: dict[str, str] = {}
    rows: dict[str, RowInfo] = {}
    for identity, members in by_row.items():
        suite, data = identity[0], identity[1]
        info = RowInfo(encoder=shown[identity], suite=suite, data=labels_of_data[data])
        label = info.encoder
        if label_count[label] > 1:  # the same name is a row of several suites or data
            label = f"{label} [{', '.join(p for p in (info.suite, info.data) if p)}]"
        rows[label] = info
        row_of.update((r.run_id, label) for r in members)
    return row_of, rows, notes


def _row_identity(record: Record) -> tuple[str, str, str, str]:
    """(suite, data key, encoder name, encoder identity) of a record's row."""
    suite = record.suite or str(record.config.get("suite") or "")
    return suite, data_key(record), record.encoder.name, _encoder_identity(record)


def _encoder_identity(record: Record) -> str:
    """What tells different encoders of one name apart: their config (less the name and, for a
    checkpoint, its path) and the checkpoint's sha256 (its path where the sha256 is unknown)."""
    entry = dict(record.config.get("encoder") or {})
    entry.pop("name", None)
    weights = None
    if record.encoder.source == "checkpoint":
        entry.pop("checkpoint", None)
        weights = record.encoder.sha256 or record.encoder.checkpoint
    return json.dumps([entry, weights], sort_keys=True, default=str)


def data_key(record: Record) -> str:
    """The dataset of a record's run: its data config less the loader settings ("" if none)."""
    data = record.config.get("data")
    if not isinstance(data, dict):
        return ""
    return json.dumps({k: v for k, v in data.items() if k != "num_workers"}, sort_keys=True)


def data_labels(keys: Iterable[str]) -> dict[str, str]:
    """A short, distinct label per data key: ``shapes`` or the ImageFolder directory's name;
    the whole path where two share a name, plus a hash where they still collide."""
    distinct = sorted(set(keys))

    def source(key: str) -> str:
        return str(json.loads(key).get("source", "")) if key else ""

    def short(key: str) -> str:
        text = source(key).rstrip("/")
        return text.rsplit("/", 1)[-1] if text else ""

    labels = {key: short(key) for key in distinct}
    for make in (source, lambda k: f"{source(k)} #{hashlib.sha256(k.encode()).hexdigest()[:6]}"):
        clashing = [k for k in distinct if sum(labels[k] == labels[o] for o in distinct) > 1]
        for key in clashing:
            labels[key] = make(key)
    return labels


def _shown_names(
    by_row: dict[tuple[str, str, str, str], list[Record]],
) -> tuple[dict[tuple[str, str, str, str], str], list[str]]:
    """The name each row shows: its encoder's name, told apart where different encoders of one
    suite and data share it (by checkpoint sha256 when those differ, else numbered in the order
    of their first run), with a note saying so."""
    groups: dict[tuple[str, str, str], list[tuple[str, str, str, str]]] = defaultdict(list)
    for identity in by_row:  # insertion order: by first run
        groups[identity[:3]].append(identity)
    shown: dict[tuple[str, str, str, str], str] = {}
    notes = []
    for (suite, _, name), identities in groups.items():
        if len(identities) == 1:
            shown[identities[0]] = name
            continue
        shas = [_sha_of(by_row[i]) for i in identities]
        short = [sha[:8] if sha else None for sha in shas]
        if all(short) and len(set(short)) == len(short):
            names = [f"{name} [{s}]" for s in short]
            how = "by the first 8 hex digits of their weights' sha256"
        else:
            names = [f"{name} ({k})" for k in range(1, len(identities) + 1)]
            how = "numbered in the order of their first run"
        shown.update(zip(identities, names, strict=True))
        where = f" in suite {suite}" if suite else ""
        notes.append(
            f"{len(identities)} different encoders are named '{name}'{where} (different "
            f"weights or configs); they are told apart {how}: {', '.join(names)}."
        )
    return shown, notes


def _sha_of(records: list[Record]) -> str | None:
    """The checkpoint sha256 of a row's records, if they are of one checkpoint."""
    shas = {r.encoder.sha256 for r in records}
    return shas.pop() if len(shas) == 1 else None


def _units(records: Sequence[Record], columns: list[str]) -> dict[str, str | None]:
    """Unit per column: the newest record's metric_info unit, else :data:`DEFAULT_UNITS`."""
    units: dict[str, str | None] = {}
    for record in sorted(records, key=_recency, reverse=True):
        for metric, info in record.metric_info.items():
            if info.unit:
                units.setdefault(_column(record.task.name, metric), info.unit)
    return {
        c: (units.get(c) or default_unit(c.split("/", 1)[1])) if "/" in c else None
        for c in columns
    }


def default_unit(metric: str) -> str | None:
    """:data:`DEFAULT_UNITS` of ``metric``, or of its stem for a variant of it (``top1_k2``,
    ``top1_best_layer``: the unit of ``top1``)."""
    return DEFAULT_UNITS.get(metric) or DEFAULT_UNITS.get(metric.split("_", 1)[0])


def _column(task: str, metric: str) -> str:
    """The leaderboard column name of a metric of a task."""
    return f"{task}/{metric}"


def _directions(records: Sequence[Record]) -> tuple[dict[str, bool], list[str]]:
    """Direction per column from metric_info, newest record first; notes on disagreements."""
    directions: dict[str, bool] = {}
    conflicts: set[str] = set()
    for record in sorted(records, key=_recency, reverse=True):
        for metric, info in record.metric_info.items():
            column = _column(record.task.name, metric)
            previous = directions.setdefault(column, info.higher_is_better)
            if previous != info.higher_is_better:
                conflicts.add(column)
    notes = [
        f"{column}: records disagree on higher_is_better; the newest record's "
        f"({'higher' if directions[column] else 'lower'} is better) is used."
        for column in sorted(conflicts)
    ]
    return directions, notes


def _all_columns(records: Sequence[Record], directions: dict[str, bool]) -> list[str]:
    """Every ``task/metric`` column, sorted; a task with no known metric gets a bare column."""
    columns = set(directions)
    for record in records:
        columns.update(_column(record.task.name, m) for m in record.metrics)
    tasks_with_metrics = {c.split("/", 1)[0] for c in columns}
    columns.update(r.task.name for r in records if r.task.name not in tasks_with_metrics)
    return sorted(columns)


def _select_columns(available: list[str], wanted: list[str] | None) -> list[str]:
    """Columns matching ``wanted`` (``task/metric`` or bare metric names), in that order."""
    if wanted is None:
        return available
    selected: list[str] = []
    for spec in wanted:
        for column in available:
            metric = column.split("/", 1)[1] if "/" in column else None
            if (column == spec or metric == spec) and column not in selected:
                selected.append(column)
    return selected


def _aggregate(
    ok: Sequence[Record], row_of: dict[str, str], labels: list[str], columns: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mean, sample std and count over seeds of the ok runs, shaped rows x columns."""
    frame = records_to_frame(ok)
    empty = pd.DataFrame(math.nan, index=pd.Index(labels, name="encoder"), columns=columns)
    if frame.empty:
        counts = empty.fillna(0).astype(int)
        return empty, empty.copy(), counts
    frame = frame.assign(
        column=frame["task"] + "/" + frame["metric"], row=frame["run_id"].map(row_of)
    )
    frame = frame[frame["column"].isin(columns)]
    grouped = frame.groupby(["row", "column"])["value"]

    def shape(series: pd.Series) -> pd.DataFrame:
        table = series.unstack("column") if not series.empty else empty
        return table.reindex(index=labels, columns=columns).rename_axis(
            index="encoder", columns=None
        )

    mean = shape(grouped.mean()).astype(float)
    std = shape(grouped.std(ddof=1)).astype(float)
    n = shape(grouped.count()).fillna(0).astype(int)
    return mean, std, n


def _failed_cells(
    failed: Sequence[Record], row_of: dict[str, str], labels: list[str], columns: list[str]
) -> pd.DataFrame:
    """True where a failed run exists for the cell's (row, task)."""
    table = pd.DataFrame(False, index=pd.Index(labels, name="encoder"), columns=columns)
    for record in failed:
        for column in columns:
            if column.split("/", 1)[0] == record.task.name:
                table.loc[row_of[record.run_id], column] = True
    return table


# --------------------------------------------------------------------------- formatting


