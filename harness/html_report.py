"""A static HTML leaderboard that opens offline: one self-contained file with a sortable table
(click a header), best cells marked, failed cells shown, each pretrained encoder's
reconstruction grid as a thumbnail and its pretraining loss curve (matplotlib), all embedded as
data URIs so the page needs no server and no network.

Each column names its unit, each cell its mean ± sample std over n seeds (as the CSV), each row
its suite and data (once above the table when all rows share them); the loss curve names the
recipe's loss. Stage directories come from the records, placed by
:func:`harness.core.records.resolve_recorded_path`, never from the current directory.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.fsutil import PathLike
from harness.core.records import Record, resolve_recorded_path
from harness.leaderboard import Leaderboard
from harness.published import Beside

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.35em .7em;text-align:right}
th{background:#f1f1f1;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e8f5e9}
td.failed{color:#b00020}
.notes{color:#555;font-size:.9em}
.origin{color:#333}
td .n{color:#777;font-size:.8em}
.enc{display:inline-block;vertical-align:top;margin:0 1.5em 1.5em 0}
.enc img{border:1px solid #ccc;max-width:420px;image-rendering:pixelated}
"""

_SCRIPT = """
document.querySelectorAll('table.lb th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var asc = th.dataset.order !== 'asc';
    table.querySelectorAll('th').forEach(function(h){ delete h.dataset.order; });
    th.dataset.order = asc ? 'asc' : 'desc';
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
var m = location.hash.match(/sort=(\d+)/);  // e.g. leaderboard.html#sort=1 opens sorted
if (m) { var th = document.querySelectorAll('table.lb th')[+m[1]]; if (th) th.click(); }
document.body.dataset.ready = '1';
"""


def _data_uri_png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


#: Names of the losses and targets of a recipe (:class:`harness.core.config.LossConfig`,
#: :class:`harness.core.config.TargetConfig`) as a plot labels them.
_LOSS_NAMES = {
    "l1": "L1",
    "l2": "L2 (MSE)",
    "smooth_l1": "smooth-L1",
    "cross_entropy": "cross-entropy",
}
_TARGET_NAMES = {
    "pixels": "pixels",
    "norm_pixels": "normalized pixels",
    "hog": "HOG features",
    "color_bins": "color bins",
    "mean_color": "mean colors",
    "tokens": "visual tokens",
}


def loss_name(recipe: dict[str, Any] | None) -> str | None:
    """What a recipe's pretraining loss is, e.g. ``L1 on masked patches' pixels``; ``None``
    without a recipe.

    Args:
        recipe: The record's resolved recipe (``Record.recipe``).
    """
    if not recipe:
        return None
    loss = recipe.get("loss") or {}
    target = (recipe.get("target") or {}).get("type", "pixels")
    kind = _LOSS_NAMES.get(loss.get("type", "l1"), str(loss.get("type")))
    where = "all" if loss.get("on") == "all" else "masked"
    text = f"{kind} on {where} patches' {_TARGET_NAMES.get(target, target)}"
    if float(loss.get("adv_weight") or 0.0) > 0:
        text += f" + {loss['adv_weight']:g} x adversarial"
    return text


def loss_curve_png(loss_jsonl: Path, title: str, loss: str | None = None) -> bytes | None:
    """A small PNG of a pretraining loss curve, or None when there is no log.

    Args:
        loss_jsonl: The stage's ``loss.jsonl`` (``{"step": ..., "loss": ...}`` per line).
        title: The plot's title.
        loss: What the loss is (see :func:`loss_name`), written under the title.
    """
    if not loss_jsonl.is_file():
        return None
    rows = [json.loads(line) for line in loss_jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=90)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}\n{loss}" if loss else title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class Curve:
    """A task's curve over the leaderboard rows (e.g. partial fine-tuning: blocks fine-tuned vs
    top-1), from the ``curve`` detail of its records (``{"x": label, "y": label, "points":
    [[x, y], ...]}``), averaged over the seeds of each row.

    Attributes:
        task: The task whose records hold the curve (``<task>-<name>`` for an entry of a
            record's ``curves`` detail).
        x: The x axis label.
        y: The y axis label.
        lines: Row label -> ``[(x, mean y), ...]`` in x order.
    """

    task: str
    x: str
    y: str
    lines: dict[str, list[tuple[float, float]]]


def record_curves(lb: Leaderboard, records: list[Record]) -> list[Curve]:
    """Every task's curve from the ok records behind the leaderboard's rows (tasks sorted)."""
    sums: dict[str, dict[str, dict[float, list[float]]]] = {}
    axes: dict[str, tuple[str, str]] = {}
    for r in records:
        label = lb.row_of.get(r.run_id)
        for key, curve in _record_curves(r):
            if label is None:
                continue
            axes.setdefault(key, (str(curve.get("x", "x")), str(curve.get("y", "y"))))
            per = sums.setdefault(key, {}).setdefault(label, {})
            for x, y in curve.get("points", []):
                per.setdefault(float(x), []).append(float(y))
    return [
        Curve(task, *axes[task], {
            label: [(x, sum(ys) / len(ys)) for x, ys in sorted(pts.items())]
            for label, pts in sorted(rows.items())
        })
        for task, rows in sorted(sums.items())
    ]  # fmt: skip


def _record_curves(r: Record) -> list[tuple[str, dict[str, Any]]]:
    """The curves of an ok record: its ``curve`` detail under the task's name, and each entry of
    its ``curves`` detail (low-shot: one per protocol) under ``<task>-<entry name>``."""
    if not r.details or r.status != "ok":
        return []
    found = [(r.task.name, r.details.get("curve"))]
    found += [(f"{r.task.name}-{c.get('name')}", c) for c in r.details.get("curves") or []
              if isinstance(c, dict)]  # fmt: skip
    return [(key, c) for key, c in found if isinstance(c, dict)]


def curve_png(curve: Curve, name: Callable[[str], str]) -> bytes:
    """A small PNG of ``curve``: one line (with markers) per row, named by ``name(label)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=90)
    for label, pts in curve.lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1, label=name(label))
    ax.set_xlabel(curve.x)
    ax.set_ylabel(curve.y)
    ax.set_title(curve.task, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_html(
    lb: Leaderboard,
    records: list[Record],
    title: str = "mimbench leaderboard",
    records_dir: PathLike | None = None,
    beside: list[Beside] | None = None,
) -> str:
    """The leaderboard as one self-contained HTML page.

    Args:
        lb: The leaderboard.
        records: The records behind it (their stage directories give the pictures).
        title: The page title.
        records_dir: Where the records were read from: relative paths of old records without a
            provenance ``cwd`` are placed from there (never from the current directory).
        beside: Published numbers beside our cells (:func:`harness.published.published_beside`),
            shown as a table under the notes.
    """
    e = html.escape
    origin_columns = [c for c, shown in zip(("suite", "data"), lb.varying(), strict=True) if shown]
    head = "".join(f"<th>{e(c)}</th>" for c in origin_columns) + "".join(
        f"<th>{e(lb.header(c))} {'&uarr;' if lb.higher_is_better.get(c, True) else '&darr;'}</th>"
        for c in lb.columns
    )
    body = [_html_row(lb, label, origin_columns) for label in lb.encoders]
    notes = "".join(f"<li>{e(n)}</li>" for n in lb.notes)
    origin = lb.origin()
    gallery = _gallery(lb, records, records_dir)
    curves = [
        f'<div class="enc"><img alt="{e(c.task)}: {e(c.x)} vs {e(c.y)}" '
        f'src="{_data_uri_png(curve_png(c, lambda label: _gallery_name(lb, label)))}"></div>'
        for c in record_curves(lb, records)
    ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        + (f"<p class='origin'>All rows: {e(origin)}.</p>" if origin else "")
        + f"<table class='lb'><thead><tr><th>encoder</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        "<p class='notes'>Cells: mean &plusmn; sample standard deviation over n seeds (ok runs); "
        "best of each column in bold.</p>"
        + (f"<ul class='notes'>{notes}</ul>" if notes else "")
        + _beside_html(lb, beside or [])
        + ("<h2>Curves</h2>" + "".join(curves) if curves else "")
        + ("<h2>Pretraining: reconstructions and loss</h2>" + "".join(gallery) if gallery else "")
        + f"<script>{_SCRIPT}</script></body></html>"
    )


def _beside_html(lb: Leaderboard, beside: list[Beside]) -> str:
    """The published numbers beside ours as a table ("" when there are none)."""
    if not beside:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(lb.row(b.row).encoder)}</td><td>{e(b.column)}</td><td>{b.ours:.2f}</td>"
        f"<td>{b.value_text}</td><td>{b.diff:+.2f}</td><td>{e(b.published.describe())}</td>"
        f"<td>{e(b.published.source)}</td></tr>"
        for b in beside
    )
    return (
        "<h2>Published numbers beside ours</h2><table class='lb'><thead><tr><th>encoder</th>"
        "<th>column</th><th>ours</th><th>published</th><th>ours - published</th>"
        "<th>published row</th><th>source</th></tr></thead>"
        f"<tbody>{rows}</tbody></table><p class='notes'>Published rows of the same recipe (or "
        "imported checkpoint format) and encoder architecture, from results/published.yaml; "
        "their data, schedules and protocols are the papers'.</p>"
    )


def _html_row(lb: Leaderboard, label: str, origin_columns: list[str]) -> str:
    """One ``<tr>``: the encoder, its suite / data where those are columns, then the cells."""
    e = html.escape
    info = lb.row(label)
    cells = [f'<td data-v="{e(info.encoder)}">{e(info.encoder)}</td>']
    cells += [f'<td data-v="{e(getattr(info, c))}">{e(getattr(info, c) or "–")}</td>'
              for c in origin_columns]
    best = {col: lb.best(col) for col in lb.columns}
    for col in lb.columns:
        n = int(lb.n.at[label, col])
        failed = bool(lb.failed.at[label, col]) if col in lb.failed.columns else False
        if n == 0:
            text, cls, v = ("failed", "failed", "") if failed else ("&ndash;", "", "")
        else:
            mean, std = float(lb.mean.at[label, col]), float(lb.std.at[label, col])
            text = f"{mean:.2f}" + (f" &plusmn; {std:.2f}" if n > 1 else "")
            text += f" <span class='n'>n={n}</span>"
            text += " &dagger;" if failed else ""
            text += " &Dagger;" if lb.on_grid_edge(label, col) else ""
            cls = "best" if label in best[col] else ""
            v = f"{mean:.6g}"
        cells.append(f'<td class="{cls}" data-v="{v}">{text}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _gallery(lb: Leaderboard, records: list[Record], records_dir: PathLike | None) -> list[str]:
    """One block per pretrained leaderboard row (its first stage found): its reconstruction
    picture and its loss curve named by the recipe's loss."""
    e = html.escape
    blocks = []
    seen: set[str] = set()
    for r in records:
        stage_text = r.details.get("stage") if r.details else None
        label = lb.row_of.get(r.run_id)
        if not stage_text or label is None or label in seen:
            continue
        stage = resolve_recorded_path(r, str(stage_text), records_dir)
        if stage is None or not stage.is_dir():
            continue
        seen.add(label)
        name = _gallery_name(lb, label)
        parts = [f"<h3>{e(name)}</h3>"]
        recon = stage / "recon.png"
        if recon.is_file():
            parts.append(f'<img alt="reconstructions of {e(name)}" '
                         f'src="{_data_uri_png(recon.read_bytes())}"><br>')
        what = loss_name(r.recipe)
        curve = loss_curve_png(stage / "loss.jsonl", f"{name} pretraining loss", what)
        if curve:
            alt = f"loss curve of {name}" + (f": {what}" if what else "")
            parts.append(f'<img alt="{e(alt)}" src="{_data_uri_png(curve)}">')
            if what:
                parts.append(f"<div class='notes'>loss: {e(what)}</div>")
        blocks.append('<div class="enc">' + "".join(parts) + "</div>")
    return blocks


def _gallery_name(lb: Leaderboard, label: str) -> str:
    """A row's name in the gallery: its encoder, with suite / data where rows differ in them."""
    info = lb.row(label)
    several_suites, several_data = lb.varying()
    extra = [p for p, shown in ((info.suite, several_suites), (info.data, several_data)) if shown]
    return f"{info.encoder} ({', '.join(extra)})" if extra else info.encoder
