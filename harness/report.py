"""Leaderboards written out: markdown, CSV, LaTeX and HTML (:mod:`harness.html_report`), from
the table model of :mod:`harness.leaderboard`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.fsutil import PathLike, atomic_write_bytes, atomic_write_text
from harness.core.records import (
    RecordScan,
    SkippedRecord,
    announce_skipped,
    scan_records,
)
from harness.html_report import curve_png, format_html, record_curves
from harness.leaderboard import (
    GRID_EDGE_MARK,
    PARTIAL_FAILURE_MARK,
    Leaderboard,
    ReportError,
    leaderboard,
)
from harness.published import (
    DEFAULT_PUBLISHED_RESULTS,
    format_beside_markdown,
    load_published_results,
    published_beside,
)


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
    if lb.on_grid_edge(encoder, column):
        text += f" {GRID_EDGE_MARK}"
    return text


def _is_best(lb: Leaderboard, encoder: str, column: str, best: dict[str, set[str]]) -> bool:
    """Whether the cell holds the best mean of its column."""
    return int(lb.n.at[encoder, column]) > 0 and encoder in best[column]


def _arrow(lb: Leaderboard, column: str) -> str:
    """The direction arrow of a column."""
    return "↑" if lb.higher_is_better.get(column, True) else "↓"


def format_markdown(lb: Leaderboard) -> str:
    """Formats a leaderboard as a markdown table followed by its origin and notes.

    Cells read ``mean ± std (n)`` over n > 1 seeds, ``mean`` for a single seed, ``failed``
    where every counted run failed; the best mean of each column is bold, respecting the
    column's direction (shown as ↑/↓ in the header). ``suite`` / ``data`` columns follow the
    encoder where the rows differ in them; otherwise one line under the table names them.

    Args:
        lb: The leaderboard.
    """
    best = {column: lb.best(column) for column in lb.columns}
    origin_columns = _origin_columns(lb)
    header = [
        "encoder",
        *origin_columns,
        *(f"{_md_escape(c)} {_arrow(lb, c)}" for c in lb.columns),
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([*(" --- " for _ in range(1 + len(origin_columns))),
                        *(" ---: " for _ in lb.columns)]) + "|",
    ]
    for encoder in lb.encoders:
        cells = [_md_escape(text) for text in _origin_cells(lb, encoder, origin_columns)]
        for column in lb.columns:
            text = _cell_text(lb, encoder, column, " ± ")
            if text is None:
                cells.append("–")
            elif _is_best(lb, encoder, column, best):
                cells.append(f"**{text}**")
            else:
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    origin = lb.origin()
    if origin:
        lines += ["", f"All rows: {_md_escape(origin)}."]
    if lb.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in lb.notes)
    return "\n".join(lines) + "\n"


def _origin_columns(lb: Leaderboard) -> list[str]:
    """The ``suite`` / ``data`` columns a table shows: those in which its rows differ."""
    several_suites, several_data = lb.varying()
    return [name for name, shown in (("suite", several_suites), ("data", several_data)) if shown]


def _origin_cells(lb: Leaderboard, label: str, origin_columns: list[str]) -> list[str]:
    """A row's encoder name, then its suite and data where those are columns."""
    info = lb.row(label)
    return [info.encoder, *(getattr(info, column) or "–" for column in origin_columns)]


def _md_escape(text: str) -> str:
    """Escapes characters that break a markdown table cell."""
    return text.replace("|", "\\|")


def format_csv(lb: Leaderboard) -> str:
    """Formats a leaderboard as CSV: one row per leaderboard row, its ``suite`` and ``data``,
    then ``<column>/mean``, ``/std``, ``/n`` (and ``/grid_edge``, True where a run's winning head
    lay on an edge of its grid, for the columns that have one).

    Args:
        lb: The leaderboard.
    """
    infos = [lb.row(label) for label in lb.encoders]
    parts: dict[str, Any] = {
        "suite": [i.suite for i in infos],
        "data": [i.data for i in infos],
    }
    for column in lb.columns:
        parts[f"{column}/mean"] = lb.mean[column].to_numpy()
        parts[f"{column}/std"] = lb.std[column].to_numpy()
        parts[f"{column}/n"] = lb.n[column].to_numpy()
        if any(lb.on_grid_edge(label, column) for label in lb.encoders):
            parts[f"{column}/grid_edge"] = [lb.on_grid_edge(label, column)
                                            for label in lb.encoders]
    table = pd.DataFrame(parts, index=pd.Index([i.encoder for i in infos], name="encoder"))
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
    origin_columns = _origin_columns(lb)
    header = [
        "encoder",
        *origin_columns,
        *(f"{latex_escape(c)} {arrows[lb.higher_is_better.get(c, True)]}" for c in lb.columns),
    ]
    lines = [
        r"\begin{tabular}{" + "l" * (1 + len(origin_columns)) + "r" * len(lb.columns) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for encoder in lb.encoders:
        cells = [latex_escape(text) for text in _origin_cells(lb, encoder, origin_columns)]
        for column in lb.columns:
            text = _cell_text(lb, encoder, column, r" $\pm$ ")
            if text is None:
                cells.append("--")
                continue
            text = text.replace(PARTIAL_FAILURE_MARK, r"$^\dagger$")
            text = text.replace(GRID_EDGE_MARK, r"$^\ddagger$")
            cells.append(rf"\textbf{{{text}}}" if _is_best(lb, encoder, column, best) else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    origin = lb.origin()
    if origin:
        lines.append(f"% All rows: {latex_escape(origin)}.")
    lines += [
        f"% {latex_escape(note.replace(PARTIAL_FAILURE_MARK, 'dagger').replace(GRID_EDGE_MARK, 'ddagger'))}"
        for note in lb.notes
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def write_report(
    records_dir: PathLike,
    out_dir: PathLike,
    scan: RecordScan | None = None,
    published: PathLike | None = DEFAULT_PUBLISHED_RESULTS,
) -> dict[str, Path]:
    """Collates every record under ``records_dir`` into ``leaderboard.{md,csv,tex,html}``.

    Record files that could not be loaded are named on stderr (once, see
    :func:`harness.core.records.announce_skipped`) and listed in a note under the md, tex and html
    tables, so no result goes missing without a word. Under the md and html tables, the
    published numbers of the rows' recipes and encoders sit beside ours
    (:func:`harness.published.published_beside`).

    Args:
        records_dir: Directory searched recursively for records; also where relative paths of
            old records are placed from (see :func:`harness.core.records.resolve_recorded_path`).
        out_dir: Where the tables are written (created if missing).
        scan: The records already loaded from ``records_dir`` (:func:`scan_records`), so a
            caller that needs them too loads them once; loaded here when ``None``.
        published: The published numbers (``results/published.yaml`` by default); ``None``:
            none beside ours.

    Returns:
        ``{"md": ..., "csv": ..., "tex": ..., "html": ...}`` paths of the written files.

    Raises:
        ReportError: If there are no records under ``records_dir``.
        PublishedError: If the published-numbers file is malformed.
    """
    root = Path(records_dir)
    if scan is None:
        scan = scan_records(root) if root.is_dir() else RecordScan([], [])
        announce_skipped(scan.skipped)
    if not scan.records:
        skipped = f" ({len(scan.skipped)} unreadable record file(s) skipped)" * bool(scan.skipped)
        raise ReportError(f"no records found under {root}{skipped}: run `mimbench run` first")
    lb = leaderboard(scan.records)
    lb.notes.extend(skipped_notes(scan.skipped))
    out = Path(out_dir)
    figures = []
    for curve in record_curves(lb, scan.records):  # one PNG per task with a curve, md links it
        png = out / f"curve-{curve.task}.png"
        atomic_write_bytes(png, curve_png(curve, lambda label: lb.row(label).encoder))
        figures.append((f"{curve.task}: {curve.x} vs {curve.y}", png.name))
    beside = (published_beside(lb, scan.records, load_published_results(published))
              if published is not None else [])
    section = format_beside_markdown(beside, lb)
    texts = {
        "md": format_markdown(lb) + "".join(f"\n![{alt}]({name})\n" for alt, name in figures)
        + (f"\n{section}" if section else ""),
        "csv": format_csv(lb),
        "tex": format_latex(lb),
        "html": format_html(lb, scan.records, records_dir=root, beside=beside),
    }
    return {
        kind: atomic_write_text(out / f"leaderboard.{kind}", text) for kind, text in texts.items()
    }


def skipped_notes(skipped: Sequence[SkippedRecord]) -> list[str]:
    """One note per record file that could not be loaded, naming it and why."""
    return [f"skipped record {item.path}: {item.reason}" for item in skipped]
