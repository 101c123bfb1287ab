"""A static HTML leaderboard that opens offline: one self-contained file with a sortable table
(click a header), best cells marked, failed cells shown, each pretrained encoder's
reconstruction grid as a thumbnail and its pretraining loss curve (matplotlib), all embedded as
data URIs so the page needs no server and no network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from harness.records import Record
from harness.report import Leaderboard

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.35em .7em;text-align:right}
th{background:#f1f1f1;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e8f5e9}
td.failed{color:#b00020}
.notes{color:#555;font-size:.9em}
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


def loss_curve_png(loss_jsonl: Path, title: str) -> bytes | None:
    """A small PNG of a pretraining loss curve, or None when there is no log."""
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
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def format_html(lb: Leaderboard, records: list[Record], title: str = "mimbench leaderboard") -> str:
    """The leaderboard as one self-contained HTML page."""
    e = html.escape
    head = "".join(
        f"<th>{e(c)} {'&uarr;' if lb.higher_is_better.get(c, True) else '&darr;'}</th>"
        for c in lb.columns
    )
    body = []
    for enc in lb.encoders:
        cells = [f'<td data-v="{e(enc)}">{e(enc)}</td>']
        for col in lb.columns:
            mean = lb.mean.at[enc, col]
            n = int(lb.n.at[enc, col]) if not math.isnan(lb.n.at[enc, col]) else 0
            failed = bool(lb.failed.at[enc, col]) if col in lb.failed.columns else False
            if n == 0:
                text, cls, v = ("failed", "failed", "") if failed else ("&ndash;", "", "")
            else:
                std = lb.std.at[enc, col]
                text = f"{mean:.2f}" + (f" &plusmn; {std:.2f} ({n})" if n > 1 else "")
                text += " &dagger;" if failed else ""
                cls = "best" if enc in lb.best(col) else ""
                v = f"{mean:.6g}"
            cells.append(f'<td class="{cls}" data-v="{v}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li>{e(n)}</li>" for n in lb.notes)
    gallery = []
    seen: set[str] = set()
    for r in records:
        stage = r.details.get("stage") if r.details else None
        if not stage or r.encoder.name in seen:
            continue
        seen.add(r.encoder.name)
        parts = [f"<h3>{e(r.encoder.name)}</h3>"]
        recon = Path(stage) / "recon.png"
        if recon.is_file():
            parts.append(f'<img alt="reconstructions of {e(r.encoder.name)}" '
                         f'src="{_data_uri_png(recon.read_bytes())}"><br>')
        curve = loss_curve_png(Path(stage) / "loss.jsonl", f"{r.encoder.name} pretraining loss")
        if curve:
            parts.append(f'<img alt="loss curve of {e(r.encoder.name)}" src="{_data_uri_png(curve)}">')
        gallery.append('<div class="enc">' + "".join(parts) + "</div>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        f"<table class='lb'><thead><tr><th>encoder</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
        + (f"<ul class='notes'>{notes}</ul>" if notes else "")
        + ("<h2>Pretraining: reconstructions (original / masked / prediction / pasted) and loss</h2>"
           + "".join(gallery) if gallery else "")
        + f"<script>{_SCRIPT}</script></body></html>"
    )
