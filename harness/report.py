"""Collation of run records into leaderboards (markdown, CSV, LaTeX).

Records are first reduced to the ones that count: ``running`` records are ignored, only the
newest version of each task is used (older versions are never mixed in silently: a note says
so), and of several records for the same (encoder, task, version, seed) the newest wins. The
ok runs are then averaged over seeds; failed runs are kept visible, never dropped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from harness.errors import UserError
from harness.fsutil import PathLike, atomic_write_text
from harness.records import Record, load_records, parse_timestamp

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

class ReportError(UserError, ValueError):
    """Nothing to report, or the records cannot be collated."""


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class Leaderboard:
    """Encoders (rows) by ``task/metric`` columns, averaged over seeds of ok runs.

    Attributes:
        mean: Mean over seeds; NaN where no ok run exists.
        std: Sample standard deviation over seeds (ddof=1); NaN where n < 2.
        n: Number of ok runs (seeds) behind each cell.
        failed: True where at least one counted run of the cell's (encoder, task) failed.
        higher_is_better: Direction of each column.
        notes: What the reader must know (older task versions ignored, duplicates dropped, ...).
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: pd.DataFrame
    higher_is_better: dict[str, bool]
    notes: list[str] = field(default_factory=list)

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
    """Keeps the newest record per (encoder, task, task version, seed).

    "Newest" is by ``finished_at`` (``started_at`` when unfinished), then ``run_id``.

    Args:
        records: Run records.

    Returns:
        The kept records (in input order) and a note when duplicates were dropped.
    """
    newest: dict[tuple[str, str, int, int], Record] = {}
    for record in records:
        key = (record.encoder.name, record.task.name, record.task.version, record.seed)
        current = newest.get(key)
        if current is None or _recency(record) > _recency(current):
            newest[key] = record
    keep = {id(r) for r in newest.values()}
    kept = [r for r in records if id(r) in keep]
    dropped = len(records) - len(kept)
    notes = []
    if dropped:
        notes.append(
            f"{dropped} older duplicate record(s) of the same (encoder, task, version, seed) "
            "were ignored; the newest run of each is reported."
        )
    return kept, notes


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

    ok = [r for r in kept if r.status == "ok"]
    failed = [r for r in kept if r.status == "failed"]
    # Columns come from every record of the current task versions, so a cell whose newest run
    # failed still shows under the metrics its task reports.
    directions, direction_notes = _directions(current)
    notes.extend(direction_notes)

    columns = _select_columns(_all_columns(current, directions), metrics)
    encoders = sorted({r.encoder.name for r in kept})
    mean, std, n = _aggregate(ok, encoders, columns)
    failed_frame = _failed_cells(failed, encoders, columns)
    if failed_frame.to_numpy().any() and (n.to_numpy() > 0)[failed_frame.to_numpy()].any():
        notes.append(
            f"{PARTIAL_FAILURE_MARK}: some seeds of this cell failed; the value is over the ok "
            "seeds only."
        )
    higher = {c: directions.get(c, True) for c in columns}
    return Leaderboard(
        mean=mean, std=std, n=n, failed=failed_frame, higher_is_better=higher, notes=notes
    )


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
    ok: Sequence[Record], encoders: list[str], columns: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Mean, sample std and count over seeds of the ok runs, shaped encoders x columns."""
    frame = records_to_frame(ok)
    empty = pd.DataFrame(math.nan, index=pd.Index(encoders, name="encoder"), columns=columns)
    if frame.empty:
        counts = empty.fillna(0).astype(int)
        return empty, empty.copy(), counts
    frame = frame.assign(column=frame["task"] + "/" + frame["metric"])
    frame = frame[frame["column"].isin(columns)]
    grouped = frame.groupby(["encoder", "column"])["value"]

    def shape(series: pd.Series) -> pd.DataFrame:
        table = series.unstack("column") if not series.empty else empty
        return table.reindex(index=encoders, columns=columns).rename_axis(
            index="encoder", columns=None
        )

    mean = shape(grouped.mean()).astype(float)
    std = shape(grouped.std(ddof=1)).astype(float)
    n = shape(grouped.count()).fillna(0).astype(int)
    return mean, std, n


def _failed_cells(
    failed: Sequence[Record], encoders: list[str], columns: list[str]
) -> pd.DataFrame:
    """True where a failed run exists for the cell's (encoder, task)."""
    table = pd.DataFrame(False, index=pd.Index(encoders, name="encoder"), columns=columns)
    for record in failed:
        for column in columns:
            if column.split("/", 1)[0] == record.task.name:
                table.loc[record.encoder.name, column] = True
    return table


# --------------------------------------------------------------------------- formatting


def _cell_text(lb: Leaderboard, encoder: str, column: str, pm: str) -> str | None:
    """The text of a cell without emphasis; ``None`` for an empty cell."""
    n = int(lb.n.at[encoder, column])
    failed = bool(lb.failed.at[encoder, column])
    if n == 0:
        return "failed" if failed else None
    mean = float(lb.mean.at[encoder, column])
    text = f"{mean:.2f}"
    if n > 1:
        text += f"{pm}{float(lb.std.at[encoder, column]):.2f} ({n})"
    if failed:
        text += f" {PARTIAL_FAILURE_MARK}"
    return text


def _is_best(lb: Leaderboard, encoder: str, column: str, best: dict[str, set[str]]) -> bool:
    """Whether the cell holds the best mean of its column."""
    return int(lb.n.at[encoder, column]) > 0 and encoder in best[column]


def _arrow(lb: Leaderboard, column: str) -> str:
    """The direction arrow of a column."""
    return "↑" if lb.higher_is_better.get(column, True) else "↓"


def format_markdown(lb: Leaderboard) -> str:
    """Formats a leaderboard as a markdown table followed by its notes.

    Cells read ``mean ± std (n)`` over n > 1 seeds, ``mean`` for a single seed, ``failed``
    where every counted run failed; the best mean of each column is bold, respecting the
    column's direction (shown as ↑/↓ in the header).

    Args:
        lb: The leaderboard.
    """
    best = {column: lb.best(column) for column in lb.columns}
    header = ["encoder", *(f"{_md_escape(c)} {_arrow(lb, c)}" for c in lb.columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" --- ", *(" ---: " for _ in lb.columns)]) + "|",
    ]
    for encoder in lb.encoders:
        cells = [_md_escape(encoder)]
        for column in lb.columns:
            text = _cell_text(lb, encoder, column, " ± ")
            if text is None:
                cells.append("–")
            elif _is_best(lb, encoder, column, best):
                cells.append(f"**{text}**")
            else:
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if lb.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in lb.notes)
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    """Escapes characters that break a markdown table cell."""
    return text.replace("|", "\\|")


def format_csv(lb: Leaderboard) -> str:
    """Formats a leaderboard as CSV: one row per encoder, ``<column>/mean``, ``/std``, ``/n``.

    Args:
        lb: The leaderboard.
    """
    parts: dict[str, pd.Series] = {}
    for column in lb.columns:
        parts[f"{column}/mean"] = lb.mean[column]
        parts[f"{column}/std"] = lb.std[column]
        parts[f"{column}/n"] = lb.n[column]
    table = pd.DataFrame(parts, index=lb.mean.index)
    table.index.name = "encoder"
    return str(table.to_csv(lineterminator="\n", float_format="%.10g"))


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escapes LaTeX special characters (underscores included) in plain text."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def format_latex(lb: Leaderboard) -> str:
    """Formats a leaderboard as a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``).

    The best mean of each column is set in ``\\textbf``; notes follow as LaTeX comments.

    Args:
        lb: The leaderboard.
    """
    best = {column: lb.best(column) for column in lb.columns}
    arrows = {True: r"$\uparrow$", False: r"$\downarrow$"}
    header = [
        "encoder",
        *(f"{latex_escape(c)} {arrows[lb.higher_is_better.get(c, True)]}" for c in lb.columns),
    ]
    lines = [
        r"\begin{tabular}{l" + "r" * len(lb.columns) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for encoder in lb.encoders:
        cells = [latex_escape(encoder)]
        for column in lb.columns:
            text = _cell_text(lb, encoder, column, r" $\pm$ ")
            if text is None:
                cells.append("--")
                continue
            text = text.replace(PARTIAL_FAILURE_MARK, r"$^\dagger$")
            cells.append(rf"\textbf{{{text}}}" if _is_best(lb, encoder, column, best) else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [
        f"% {latex_escape(note.replace(PARTIAL_FAILURE_MARK, 'dagger'))}" for note in lb.notes
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_report(records_dir: PathLike, out_dir: PathLike) -> dict[str, Path]:
    """Collates every record under ``records_dir`` into ``leaderboard.{md,csv,tex}``.

    Invalid record files are skipped with a warning (see :func:`load_records`).

    Args:
        records_dir: Directory searched recursively for records.
        out_dir: Where the tables are written (created if missing).

    Returns:
        ``{"md": ..., "csv": ..., "tex": ...}`` paths of the written files.

    Raises:
        ValueError: If there are no records under ``records_dir``.
    """
    root = Path(records_dir)
    records = load_records(root) if root.is_dir() else []
    if not records:
        raise ReportError(f"no records found under {root}: run `mimbench run` first")
    lb = leaderboard(records)
    out = Path(out_dir)
    from harness.html_report import format_html

    texts = {"md": format_markdown(lb), "csv": format_csv(lb), "tex": format_latex(lb),
             "html": format_html(lb, records)}
    return {
        kind: atomic_write_text(out / f"leaderboard.{kind}", text) for kind, text in texts.items()
    }
