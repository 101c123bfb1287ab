"""Ablation tables: a sweep's rows against each metric, with the published numbers beside ours.

A sweep (:mod:`harness.sweep`) reproduces one ablation table of a paper, e.g. MAE's decoder
depth (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Table 1a) or
SimMIM's masking strategy (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling",
CVPR 2022, Table 1). Every record of a sweep row carries a :class:`~harness.core.records.SweepInfo`
(sweep name, table, row index, axis tags), from which this module rebuilds the table:

* rows: the sweep's rows in the sweep's order, labelled by their axis values;
* columns: the metrics (``task/metric``), each cell the mean ± sample std over seeds;
* beside each metric that a paper reports: the published number and ``ours - published``.

Published numbers come from ``results/published_ablations.yaml``: a table's ``id`` is the
sweep's ``name``, its rows are matched to ours by their tags, and each published metric names
the mimbench ``task``/``metric`` it is compared with (``lin`` -> ``linear_probe/top1``). A row
or metric without a published number shows blank; published rows that are not sweep rows (MAE's
PCA target) are listed under the table. Records are selected as the leaderboard selects them
(:mod:`harness.report`): running ones are ignored, only each task's newest version counts, and of
several records of one (row, encoder, task, seed) the newest wins.

Outputs per sweep: ``<name>.md``, ``.csv``, ``.tex`` and ``.png`` (metric against each swept
axis) under ``<out>/ablation/``.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.core.errors import UserError
from harness.core.fsutil import PathLike, atomic_write_text
from harness.core.records import Record, SweepInfo, load_records, parse_timestamp
from harness.leaderboard import PARTIAL_FAILURE_MARK, data_key, data_labels, newest_task_versions
from harness.report import latex_escape
from harness.sweep import tag_text, variant_name

#: How the published file writes a number the paper prints as N/A (not reported).
NOT_REPORTED = "N/A"

#: The published numbers shipped with the repository.
DEFAULT_PUBLISHED = Path(__file__).resolve().parents[1] / "results" / "published_ablations.yaml"


#: The header of the AvgDist column and the label of its plot axis.
AVGDIST_LABEL = "AvgDist (px)"


class AblationError(UserError, ValueError):
    """The published-numbers file is malformed, or there is no sweep to report."""


# --------------------------------------------------------------------------- published numbers


@dataclass
class PublishedMetric:
    """A metric a paper reports and the mimbench column it is compared with."""

    key: str  # as in the paper's table, e.g. "lin"
    column: str  # "task/metric", e.g. "linear_probe/top1"
    description: str = ""


@dataclass
class PublishedTable:
    """One published ablation table (an entry of ``tables:`` in the published file)."""

    id: str
    paper: str  # the citation
    table: str  # e.g. "Table 1a"
    setting: str
    verified: bool
    metrics: list[PublishedMetric]
    rows: list[dict[str, Any]]  # entries with ``tags`` (a sweep row)
    unmatched: list[dict[str, Any]]  # entries with ``row: null`` (not a sweep row here)
    note: str = ""
    match_by_row: bool = False  # rows of a scaled-down stand-in sweep match by row index

    def lookup(self, tags: dict[str, Any]) -> dict[str, Any] | None:
        """The published row whose tags equal ``tags``, if any."""
        key = _tags_key(tags)
        return next((r for r in self.rows if _tags_key(r["tags"]) == key), None)

    def lookup_row(self, tags: dict[str, Any], row: int) -> tuple[dict[str, Any] | None, bool]:
        """The published row of a sweep row: by its tags; with ``match_by_row``, the one at its
        row index (a stand-in's values may equal another paper row's), by tags only where no
        published row has that index. Returns the row and whether it was matched by index
        although its tags differ."""
        if self.match_by_row:
            at = next((r for r in self.rows if r.get("row") == row), None)
            if at is not None:
                return at, _tags_key(at["tags"]) != _tags_key(tags)
        return self.lookup(tags), False


def load_published(path: PathLike = DEFAULT_PUBLISHED) -> dict[str, PublishedTable]:
    """Reads the published ablation numbers, keyed by table id (= sweep name).

    Args:
        path: A YAML file in the format of ``results/published_ablations.yaml``.

    Raises:
        AblationError: The file exists but is malformed (the message names the key).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise AblationError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tables"), list):
        raise AblationError(f"{p}: expected a mapping with a 'tables:' list")
    papers = data.get("papers") or {}
    metrics_spec = data.get("metrics") or {}
    metrics: dict[str, PublishedMetric] = {}
    for key, spec in metrics_spec.items():
        if not isinstance(spec, dict) or not spec.get("task") or not spec.get("metric"):
            raise AblationError(
                f"{p}: metrics.{key}: give the mimbench 'task' and 'metric' it is compared with, "
                "e.g. {description: ..., task: linear_probe, metric: top1}"
            )
        metrics[str(key)] = PublishedMetric(
            str(key), f"{spec['task']}/{spec['metric']}", str(spec.get("description", ""))
        )
    out: dict[str, PublishedTable] = {}
    for i, t in enumerate(data["tables"]):
        if not isinstance(t, dict) or "id" not in t:
            raise AblationError(f"{p}: tables.{i}: each table needs an 'id' (the sweep's name)")
        rows: list[dict[str, Any]] = []
        unmatched: list[dict[str, Any]] = []
        for j, r in enumerate(t.get("rows") or []):
            if not isinstance(r, dict):
                raise AblationError(f"{p}: tables.{i}.rows.{j}: a row must be a mapping")
            (rows if isinstance(r.get("tags"), dict) else unmatched).append(r)
        used = [m for k, m in metrics.items() if any(k in r for r in t.get("rows") or [])]
        paper = t.get("paper", "")
        out[str(t["id"])] = PublishedTable(
            id=str(t["id"]),
            paper=str(papers.get(paper, paper)),
            table=str(t.get("table", "")),
            setting=" ".join(str(t.get("setting", "")).split()),
            verified=bool(t.get("verified")),
            metrics=used,
            rows=rows,
            unmatched=unmatched,
            note=" ".join(str(t.get("note", "")).split()),
            match_by_row=bool(t.get("match_by_row")),
        )
    return out


# --------------------------------------------------------------------------- the table


@dataclass
class AblationTable:
    """One sweep's table: rows (sweep order) by ``task/metric`` columns.

    Attributes:
        name: The sweep's name (= the published table's id).
        table: The table it reproduces, e.g. ``"MAE Table 1a"``.
        axes: The axis tag names, in the sweep's order.
        tags: Per row (same order as the frames' index): the axis values.
        encoders: Per row: the suite's encoder (a sweep over a suite of several encoders has a
            row per row and encoder).
        mean: Mean over seeds of the ok runs; index = row labels, columns = ``task/metric``.
        std: Sample standard deviation over seeds (ddof=1); NaN where n < 2.
        n: Number of ok runs (seeds) behind each cell.
        failed: True where a counted run of the cell's (row, task) failed.
        published: The published number beside each cell (NaN where none).
        published_key: Column -> the paper's name of the metric (e.g. ``"lin"``).
        higher_is_better: Direction of each column.
        cases: Per row, the paper's name of the row (``case`` in the published file), if any.
        source: The published table, if the published file has one for this sweep.
        total_rows: Rows the sweep has (the table shows the ones with records).
        notes: What the reader must know.
        not_reported: ``(row, column)`` cells the paper prints as N/A (shown as "N/A").
        avgdist: Per row, the AvgDist of its pretraining's masking in pixels (SimMIM Sec. 4.1.2:
            mean distance of a masked pixel to the nearest visible one; from the records'
            ``details.avgdist``, which the pretraining summary stores); None where unknown.
    """

    name: str
    table: str | None
    axes: list[str]
    tags: list[dict[str, Any]]
    encoders: list[str]
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: pd.DataFrame
    published: pd.DataFrame
    published_key: dict[str, str]
    higher_is_better: dict[str, bool]
    cases: list[str | None]
    source: PublishedTable | None
    total_rows: int
    notes: list[str] = field(default_factory=list)
    not_reported: set[tuple[str, str]] = field(default_factory=set)

    def published_text(self, row: str, column: str) -> str:
        """The published cell as the paper prints it (``70.0``, ``N/A``), blank where none."""
        if (row, column) in self.not_reported:
            return NOT_REPORTED
        return _num_text(float(self.published.at[row, column]), "paper")
    avgdist: list[float | None] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        """The row labels, in the sweep's order."""
        return [str(i) for i in self.mean.index]

    @property
    def has_avgdist(self) -> bool:
        """Whether the rows' AvgDist differ (then it is a column and an x axis of the plot): a
        sweep that does not vary the masking (MAE's decoder tables) gets no constant column."""
        known = {round(a, 6) for a in self.avgdist if a is not None}
        return len(known) > 1

    @property
    def several_encoders(self) -> bool:
        """Whether rows differ by encoder as well as by axis values."""
        return len(set(self.encoders)) > 1

    @property
    def columns(self) -> list[str]:
        """The ``task/metric`` columns."""
        return [str(c) for c in self.mean.columns]

    @property
    def diff(self) -> pd.DataFrame:
        """``ours - published`` per cell (NaN where either is missing)."""
        return self.mean - self.published

    def has_ours(self, column: str) -> bool:
        """Whether any row has a value of ours in ``column``."""
        return bool((self.n[column] > 0).any() or self.failed[column].any())

    def has_published(self, column: str) -> bool:
        """Whether any row has a published number (or N/A) in ``column``."""
        na = any(c == column for _, c in self.not_reported)
        return bool(self.published[column].notna().any()) or na


def sweep_names(records: Iterable[Record]) -> list[str]:
    """The sweeps that records belong to, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        if r.sweep is not None:
            seen.setdefault(r.sweep.name, None)
    return list(seen)


def ablation_tables(
    records: Iterable[Record], published: dict[str, PublishedTable] | None = None
) -> list[AblationTable]:
    """One :class:`AblationTable` per sweep the records belong to (records outside sweeps are
    ignored).

    Args:
        records: Run records.
        published: Published tables by id (:func:`load_published`); None: no published numbers.
    """
    records = list(records)
    tables = []
    for name in sweep_names(records):
        groups = _origin_groups([r for r in records if r.sweep is not None and r.sweep.name == name])
        labels = data_labels({data for _, data in groups})
        for (suite, data), group in groups.items():
            t = ablation_table(group, name, (published or {}).get(name))
            if len(groups) > 1:  # one table per (suite, data): never averaged across them
                t.name = f"{name} ({suite or 'no suite'}, {labels[data] or 'no data'})"
                t.notes.append(
                    f"sweep '{name}' has records of {len(groups)} (suite, data) pairs; each has "
                    "its own table."
                )
            tables.append(t)
    return tables


def _origin_groups(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    """The records by the suite and the data of their runs, in first-seen order."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.suite or "", data_key(r)), []).append(r)
    return groups


def ablation_table(
    records: Sequence[Record], name: str, source: PublishedTable | None = None
) -> AblationTable:
    """The table of sweep ``name`` from the records of its rows.

    Args:
        records: Run records (others than the sweep's are ignored).
        name: The sweep's name.
        source: The published table to put beside ours, if any.

    Raises:
        AblationError: No finished record belongs to the sweep.
    """
    mine = [
        r for r in records if r.sweep is not None and r.sweep.name == name and r.status != "running"
    ]
    if not mine:
        raise AblationError(f"no finished records of sweep '{name}': run the sweep first")
    current, notes = newest_task_versions(mine)
    kept, dropped = _newest_per_cell(current)
    if dropped:
        notes.append(
            f"{dropped} older duplicate record(s) of the same (row, encoder, task, seed) were "
            "ignored; the newest run of each is reported."
        )
    newest_info = max(kept, key=_recency).sweep
    assert newest_info is not None

    # rows: (tags, encoder) in the sweep's order; an encoder column only when there are several
    encoders = sorted({_base_encoder(r) for r in kept})
    row_of: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    for r in sorted(kept, key=_recency):  # the newest record's row index wins
        assert r.sweep is not None
        row_of[(_tags_key(r.sweep.tags), _base_encoder(r))] = (r.sweep.row, r.sweep.tags)
    order = sorted(row_of, key=lambda k: (row_of[k][0], encoders.index(k[1])))
    labels = [_row_label(row_of[k][1], k[1] if len(encoders) > 1 else None) for k in order]
    label_of = dict(zip(order, labels, strict=True))

    directions: dict[str, bool] = {}
    for r in sorted(current, key=_recency):
        for metric, info in r.metric_info.items():
            directions[f"{r.task.name}/{metric}"] = info.higher_is_better
    ours = sorted(directions)
    pub_cols = [m.column for m in source.metrics] if source else []
    columns = pub_cols + [c for c in ours if c not in pub_cols]  # the paper's metrics first

    values: dict[tuple[str, str], list[float]] = {}
    failed = pd.DataFrame(False, index=labels, columns=columns)
    for r in kept:
        label = label_of[(_tags_key(r.sweep.tags), _base_encoder(r))]  # type: ignore[union-attr]
        if r.status == "failed":
            for c in columns:
                if c.split("/", 1)[0] == r.task.name:
                    failed.loc[label, c] = True
            continue
        for metric, v in r.metrics.items():
            values.setdefault((label, f"{r.task.name}/{metric}"), []).append(float(v))
    mean = pd.DataFrame(math.nan, index=labels, columns=columns)
    std = mean.copy()
    n = pd.DataFrame(0, index=labels, columns=columns)
    for (label, c), vs in values.items():
        s = pd.Series(vs, dtype=float)
        mean.loc[label, c] = s.mean()
        std.loc[label, c] = s.std(ddof=1) if len(vs) > 1 else math.nan
        n.loc[label, c] = len(vs)

    published = pd.DataFrame(math.nan, index=labels, columns=columns)
    not_reported: set[tuple[str, str]] = set()
    cases: list[str | None] = []
    by_index: list[str] = []
    for k, label in zip(order, labels, strict=True):
        prow, indexed = source.lookup_row(row_of[k][1], row_of[k][0]) if source else (None, False)
        prow = prow or {}
        if indexed and prow:
            by_index.append(label)
        cases.append(str(prow["case"]) if prow.get("case") else None)
        for m in source.metrics if source else []:
            pv = prow.get(m.key)
            if isinstance(pv, (int, float)) and not isinstance(pv, bool):
                published.loc[label, m.column] = float(pv)
            elif pv == NOT_REPORTED:
                not_reported.add((label, m.column))
    if by_index:
        notes.append(
            f"{len(by_index)} row(s) matched to the paper's rows by their row index, not their "
            "values: this sweep is a scaled-down stand-in of the paper's table (the 'case' "
            "column names the paper's row)."
        )

    notes.extend(_source_notes(source, name, newest_info, len({k[0] for k in order})))
    if failed.to_numpy().any() and (n.to_numpy() > 0)[failed.to_numpy()].any():
        notes.append(
            f"{PARTIAL_FAILURE_MARK}: some seeds of this cell failed; the value is over "
            "the ok seeds only."
        )
    return AblationTable(
        name=name,
        table=newest_info.table,
        axes=list(newest_info.axes),
        tags=[row_of[k][1] for k in order],
        encoders=[k[1] for k in order],
        mean=mean,
        std=std,
        n=n,
        failed=failed,
        published=published,
        not_reported=not_reported,
        published_key={m.column: m.key for m in (source.metrics if source else [])},
        higher_is_better={c: directions.get(c, True) for c in columns},
        cases=cases,
        source=source,
        total_rows=newest_info.rows,
        notes=notes,
        avgdist=_row_avgdist(kept, [label_of[k] for k in order], label_of),
    )


def _row_avgdist(
    records: Sequence[Record], labels: list[str], label_of: dict[tuple[str, str], str]
) -> list[float | None]:
    """Per row label, the mean of its records' AvgDist (``details.avgdist.mean``; the seeds of
    a row share the masking, so they agree up to their Monte-Carlo error); None without one."""
    values: dict[str, list[float]] = {}
    for r in records:
        avg = r.details.get("avgdist")
        if isinstance(avg, dict) and _is_number(avg.get("mean")):
            label = label_of[(_tags_key(r.sweep.tags), _base_encoder(r))]  # type: ignore[union-attr]
            values.setdefault(label, []).append(float(avg["mean"]))
    return [sum(values[lb]) / len(values[lb]) if lb in values else None for lb in labels]


def _source_notes(
    source: PublishedTable | None, name: str, info: SweepInfo, shown: int
) -> list[str]:
    """Notes on the published numbers and on rows without records."""
    notes = []
    if shown < info.rows:
        notes.append(
            f"{shown} of the sweep's {info.rows} rows have records; run the sweep again "
            "to fill in the rest."
        )
    if source is None:
        notes.append(
            f"no published numbers for sweep '{name}' (no table with id '{name}' in the "
            "published file)."
        )
        return notes
    notes.append(f"published: {source.paper}, {source.table}; setting: {source.setting}.")
    if not source.rows and not source.unmatched:
        extra = f" ({source.note})" if source.note else ""
        notes.append(f"no published number is recorded for this table yet{extra}.")
    for r in source.unmatched:
        nums = ", ".join(
            f"{m.key} {r[m.key]:g}"
            for m in source.metrics
            if isinstance(r.get(m.key), (int, float))
        )
        notes.append(
            f"published row without a sweep row here: {r.get('case', '?')}"
            + (f" ({nums})" if nums else "")
            + "."
        )
    if source.rows:
        notes.append("Δ = ours - published, in the metric's unit.")
    return notes


def _newest_per_cell(records: Sequence[Record]) -> tuple[list[Record], int]:
    """The newest record per (suite, data, row, encoder, task, task version, seed) and how many
    were dropped."""
    newest: dict[tuple[Any, ...], Record] = {}
    for r in records:
        assert r.sweep is not None
        key = (r.suite, data_key(r), _tags_key(r.sweep.tags), _base_encoder(r), r.task.name,
               r.task.version, r.seed)
        if key not in newest or _recency(r) > _recency(newest[key]):
            newest[key] = r
    return list(newest.values()), len(records) - len(newest)


def _recency(record: Record) -> tuple[str, str]:
    """Sort key: when the record finished (or started), normalized to UTC, then its run id."""
    stamp = record.finished_at or record.started_at
    try:
        when = parse_timestamp(stamp).isoformat()
    except ValueError:
        when = ""
    return when, record.run_id


def _base_encoder(record: Record) -> str:
    """The suite's encoder name (records of sweep rows name it ``<encoder>@<row>``)."""
    return record.encoder.name.split("@", 1)[0]


def _tags_key(tags: dict[str, Any]) -> str:
    return json.dumps(tags, sort_keys=True)


def _row_label(tags: dict[str, Any], encoder: str | None) -> str:
    label = variant_name(tags)
    return f"{label} ({encoder})" if encoder else label


# --------------------------------------------------------------------------- formatting


def _short(table: AblationTable, column: str) -> str:
    """A column's header: the paper's name of the metric when it has one."""
    return table.published_key.get(column, column)


def _ours_text(t: AblationTable, row: str, column: str, pm: str) -> str:
    n = int(t.n.at[row, column])
    failed = bool(t.failed.at[row, column])
    if n == 0:
        return "failed" if failed else ""
    text = f"{float(t.mean.at[row, column]):.2f}"
    if n > 1:
        text += f"{pm}{float(t.std.at[row, column]):.2f} ({n})"
    return text + (f" {PARTIAL_FAILURE_MARK}" if failed else "")


def _num_text(value: float, fmt: str) -> str:
    """``value`` formatted; blank for NaN. ``fmt="paper"``: as the paper prints it (``70.0``)."""
    if value != value:
        return ""
    return repr(float(value)) if fmt == "paper" else format(value, fmt)


def _layout(t: AblationTable) -> list[tuple[str, str]]:
    """The table's value columns as ``(kind, column)``: kind is ours, published or diff."""
    cols: list[tuple[str, str]] = []
    for c in t.columns:
        ours, pub = t.has_ours(c), t.has_published(c)
        if ours:
            cols.append(("ours", c))
        if pub:
            cols.append(("published", c))
        if ours and pub:
            cols.append(("diff", c))
    return cols


def _title(t: AblationTable) -> str:
    return f"{t.table}: {t.name}" if t.table else t.name


def _row_cells(t: AblationTable, i: int) -> list[str]:
    """The axis values (and the paper's name of the row) of row ``i``."""
    cells = [tag_text(t.tags[i].get(a, "")) for a in t.axes]
    if t.several_encoders:
        cells.append(t.encoders[i])
    if any(t.cases):
        cells.append(t.cases[i] or "")
    return cells


def _avgdist_cells(t: AblationTable, i: int) -> list[str]:
    """Row ``i``'s AvgDist, the table's last column (none when no row has one)."""
    if not t.has_avgdist:
        return []
    avg = t.avgdist[i]
    return ["" if avg is None else f"{avg:.1f}"]


def _row_header(t: AblationTable) -> list[str]:
    head = list(t.axes)
    if t.several_encoders:
        head.append("encoder")
    if any(t.cases):
        head.append("case (paper)")
    return head


def format_markdown(t: AblationTable) -> str:
    """The table in markdown, the paper's layout: one row per sweep row, and per metric our
    mean ± std (n seeds), the published number and the difference; notes below.

    Args:
        t: The table.
    """
    layout = _layout(t)
    names = {"ours": "{} (ours)", "published": "{} (paper)", "diff": "Δ {}"}
    arrows = {c: "↑" if t.higher_is_better.get(c, True) else "↓" for c in t.columns}
    avg_head = [AVGDIST_LABEL] if t.has_avgdist else []
    header = [*_row_header(t)] + [
        names[k].format(_short(t, c)) + (f" {arrows[c]}" if k == "ours" else "") for k, c in layout
    ] + avg_head
    lines = [
        f"### {_title(t)}",
        "",
        "| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
        "|" + "|".join([" --- "] * len(_row_header(t))
                       + [" ---: "] * (len(layout) + len(avg_head))) + "|",
    ]
    for i, row in enumerate(t.rows):
        cells = _row_cells(t, i)
        for kind, c in layout:
            if kind == "ours":
                cells.append(_ours_text(t, row, c, " ± ") or "–")
            elif kind == "published":
                cells.append(t.published_text(row, c))
            else:
                cells.append(_num_text(float(t.diff.at[row, c]), "+.2f"))
        cells += _avgdist_cells(t, i)
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    if t.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in t.notes)
    return "\n".join(lines) + "\n"


def format_csv(t: AblationTable) -> str:
    """The table as CSV: the axis columns (values as JSON for mappings), the paper's row name,
    then per metric ``<column>/mean``, ``/std``, ``/n``, ``/published``, ``/diff``.

    Args:
        t: The table.
    """
    data: dict[str, list[Any]] = {"row": list(t.rows)}
    for a in t.axes:
        data[f"tag.{a}"] = [
            json.dumps(tags.get(a), sort_keys=True)
            if isinstance(tags.get(a), (dict, list))
            else tags.get(a)
            for tags in t.tags
        ]
    data["case"] = [c or "" for c in t.cases]
    if t.has_avgdist:
        data["avgdist"] = [math.nan if a is None else a for a in t.avgdist]
    for c in t.columns:
        data[f"{c}/mean"] = list(t.mean[c])
        data[f"{c}/std"] = list(t.std[c])
        data[f"{c}/n"] = list(t.n[c])
        data[f"{c}/published"] = list(t.published[c])
        data[f"{c}/diff"] = list(t.diff[c])
    buf = io.StringIO()
    pd.DataFrame(data).to_csv(buf, index=False, lineterminator="\n", float_format="%.10g")
    return buf.getvalue()


def format_latex(t: AblationTable) -> str:
    """The table as a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); a header row
    groups each metric's ours / paper / Δ columns; notes follow as LaTeX comments.

    Args:
        t: The table.
    """
    layout = _layout(t)
    head = _row_header(t)
    groups: list[tuple[str, int]] = []
    for _, c in layout:
        if groups and groups[-1][0] == c:
            groups[-1] = (c, groups[-1][1] + 1)
        else:
            groups.append((c, 1))
    top = [""] * len(head) + [
        rf"\multicolumn{{{k}}}{{c}}{{{latex_escape(_short(t, c))}}}" for c, k in groups
    ]
    sub = {"ours": "ours", "published": "paper", "diff": r"$\Delta$"}
    avg_head = [latex_escape(AVGDIST_LABEL)] if t.has_avgdist else []
    top += [""] * len(avg_head)
    lines = [
        rf"% {latex_escape(_title(t))}",
        r"\begin{tabular}{" + "l" * len(head) + "r" * (len(layout) + len(avg_head)) + "}",
        r"\toprule",
        " & ".join(top) + r" \\",
    ]
    start = len(head) + 1
    rules = []
    for _, k in groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + k - 1}}}")
        start += k
    lines.append(" ".join(rules))
    lines.append(" & ".join([latex_escape(h) for h in head] + [sub[k] for k, _ in layout]
                            + avg_head) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(t.rows):
        cells = [latex_escape(x) for x in _row_cells(t, i)]
        for kind, c in layout:
            if kind == "ours":
                text = _ours_text(t, row, c, r" $\pm$ ").replace(
                    PARTIAL_FAILURE_MARK, r"$^\dagger$"
                )
            elif kind == "published":
                text = t.published_text(row, c)
            else:
                text = _num_text(float(t.diff.at[row, c]), "+.2f")
            cells.append(text or "--")
        cells += _avgdist_cells(t, i)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {latex_escape(note.replace(PARTIAL_FAILURE_MARK, 'dagger'))}" for note in t.notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_png(t: AblationTable, path: PathLike) -> Path | None:
    """Plots each metric (rows of panels) against each swept axis (columns of panels).

    Numeric axes are plotted on a numeric x axis, others as categories in the sweep's order. In
    a grid over several axes, each panel draws one line per combination of the other axes. Error
    bars are the std over seeds; published numbers are drawn as crosses.

    Args:
        t: The table.
        path: The PNG to write.

    Returns:
        The path, or None when there is nothing to plot (no metric of ours).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in t.columns if (t.n[c] > 0).any()]
    if not metrics or not t.axes:
        return None
    xaxes = [*t.axes, *([AVGDIST_LABEL] if t.has_avgdist else [])]
    fig, axs = plt.subplots(
        len(metrics), len(xaxes), squeeze=False, figsize=(4.2 * len(xaxes), 3.2 * len(metrics))
    )
    for mi, metric in enumerate(metrics):
        for ai, axis in enumerate(xaxes):
            ax = axs[mi][ai]
            if axis == AVGDIST_LABEL:  # SimMIM Fig. 3b: the metric of every row against AvgDist
                _plot_against_avgdist(ax, t, metric)
                continue
            values: list[Any] = [tags.get(axis) for tags in t.tags]
            numeric = all(_is_number(v) for v in values)
            cats: list[str] = []
            for v in values:
                if tag_text(v) not in cats:
                    cats.append(tag_text(v))
            groups: dict[str, list[int]] = {}
            for i, tags in enumerate(t.tags):
                others = {k: v for k, v in tags.items() if k != axis}
                enc = t.encoders[i] if t.several_encoders else ""
                key = variant_name(others) if others else ""
                key = f"{key} {enc}".strip() if enc else key
                groups.setdefault(key, []).append(i)
            for key, idx in groups.items():
                xs = [float(values[i]) if numeric else cats.index(tag_text(values[i])) for i in idx]
                order = sorted(range(len(idx)), key=lambda j: xs[j])
                xs = [xs[j] for j in order]
                idx = [idx[j] for j in order]
                ys = [float(t.mean.iloc[i][metric]) for i in idx]
                es = [float(t.std.iloc[i][metric]) for i in idx]
                es = [0.0 if e != e else e for e in es]
                label = "ours" + (f" ({key})" if key and key != "base" else "")
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
                pub = [float(t.published.iloc[i][metric]) for i in idx]
                if any(p == p for p in pub):
                    ax.plot(
                        xs,
                        pub,
                        linestyle="--",
                        marker="x",
                        color="gray",
                        label="paper" + (f" ({key})" if key and key != "base" else ""),
                    )
            if not numeric:
                ax.set_xticks(range(len(cats)))
                ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(axis)
            ax.set_ylabel(
                f"{t.published_key[metric]} ({metric})" if metric in t.published_key else metric
            )
            ax.grid(alpha=0.3)
            if mi == 0:  # each column's lines differ: a legend per axis
                ax.legend(fontsize=7)
    fig.suptitle(_title(t))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_against_avgdist(ax: Any, t: AblationTable, metric: str) -> None:
    """One point per row with an AvgDist: the metric (error bar: std over seeds) against the
    row's AvgDist, labelled with the row; published numbers as crosses."""
    idx = [i for i, a in enumerate(t.avgdist) if a is not None and t.n.iloc[i][metric] > 0]
    xs = [float(t.avgdist[i]) for i in idx]  # type: ignore[arg-type]
    ys = [float(t.mean.iloc[i][metric]) for i in idx]
    es = [float(t.std.iloc[i][metric]) for i in idx]
    ax.errorbar(xs, ys, yerr=[0.0 if e != e else e for e in es], marker="o", linestyle="none",
                capsize=3, label="ours")
    for x, y, i in zip(xs, ys, idx, strict=True):
        ax.annotate(t.rows[i], (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    pub = [(x, float(t.published.iloc[i][metric])) for x, i in zip(xs, idx, strict=True)]
    pub = [(x, p) for x, p in pub if p == p]
    if pub:
        ax.plot([x for x, _ in pub], [p for _, p in pub], linestyle="none", marker="x",
                color="gray", label="paper")
    ax.set_xlabel(AVGDIST_LABEL)
    ax.set_ylabel(f"{t.published_key[metric]} ({metric})" if metric in t.published_key else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- files


def write_ablation_reports(
    records: PathLike | Sequence[Record],
    out_dir: PathLike,
    published: PathLike | None = DEFAULT_PUBLISHED,
) -> dict[str, dict[str, Path]]:
    """Writes ``<out_dir>/ablation/<sweep>.{md,csv,tex,png}`` for every sweep in the records.

    Args:
        records: A records directory (searched recursively) or the records themselves.
        out_dir: The report directory (the suite directory by default in the CLI).
        published: The published-numbers file; None or a missing file: no published numbers.

    Returns:
        ``{sweep name: {"md": path, "csv": ..., "tex": ..., "png": ...}}``; empty when no
        record belongs to a sweep (``png`` is left out when there is nothing to plot).
    """
    recs = (
        load_records(records) if isinstance(records, (str, Path)) else list(records)  # type: ignore[arg-type]
    )
    if not sweep_names(recs):
        return {}
    pub = load_published(published) if published is not None and Path(published).is_file() else {}
    out = Path(out_dir) / "ablation"
    written: dict[str, dict[str, Path]] = {}
    for t in ablation_tables(recs, pub):
        if published is not None and not Path(published).is_file():
            t.notes.append(f"published numbers file {published} not found: none shown.")
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", t.name) or "sweep"
        paths = {
            kind: atomic_write_text(out / f"{stem}.{kind}", text)
            for kind, text in (
                ("md", format_markdown(t)),
                ("csv", format_csv(t)),
                ("tex", format_latex(t)),
            )
        }
        png = plot_png(t, out / f"{stem}.png")
        if png is not None:
            paths["png"] = png
        written[t.name] = paths
    return written
