"""The static HTML leaderboard: content, best-cell marking, offline self-containment."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from test_report import record, standard_records  # noqa: F401  (tests/harness on sys.path)

from harness.html_report import format_html
from harness.report import leaderboard


class _Table(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str]]] = []
        self.srcs: list[str] = []
        self._cell: list[str] | None = None
        self._cls = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell, self._cls = [], a.get("class") or ""
        elif tag in ("img", "script", "link") and (a.get("src") or a.get("href")):
            self.srcs.append(a.get("src") or a.get("href"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(("".join(self._cell).strip(), self._cls))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_table_marks_best_and_failed_cells(tmp_path):
    records = standard_records() + [record("broken", 0, {}, status="failed")]
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "loss.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 20)))
    records[0].details["stage"] = str(stage)
    page = format_html(leaderboard(records), records)
    p = _Table()
    p.feed(page)
    header = [c for c, _ in p.rows[0]]
    body = {r[0][0]: r[1:] for r in p.rows[1:]}
    assert set(body) == {"mae", "simmim", "random", "broken"}
    col = next(i for i, h in enumerate(header[1:]) if h.startswith("linear_probe/top1"))
    assert body["simmim"][col][1] == "best" and body["mae"][col][1] != "best"
    loss_col = next(i for i, h in enumerate(header[1:]) if h.startswith("linear_probe/loss"))
    assert body["mae"][loss_col][1] == "best"  # lower is better
    assert body["broken"][col] == ("failed", "failed")
    assert body["simmim"][col][0].startswith("73.17")  # mean of 72, 73, 74.5
    # self-contained: every image is a data URI, nothing points at the network
    assert p.srcs and all(s.startswith("data:image/png;base64,") for s in p.srcs)
    assert not re.search(r"(src|href)=[\"']?https?:", page)


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_html_in_a_real_headless_browser(tmp_path):
    """Chromium renders the page, runs its script and sorts the table by a clicked column."""
    import os
    import subprocess

    exe = _chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: scripts/setup.sh installs Debian's chromium")
        pytest.skip("chromium not installed (scripts/setup.sh installs it)")
    records = standard_records()
    page = tmp_path / "lb.html"
    page.write_text(format_html(leaderboard(records), records))
    header_cells = _Table()
    header_cells.feed(page.read_text())
    col = 1 + next(i for i, (h, _) in enumerate(header_cells.rows[0][1:]) if h.startswith("linear_probe/top1"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    out = subprocess.run([exe, *flags, "--dump-dom", f"file://{page}#sort={col}"],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'data-ready="1"' in dom, out.stderr[-2000:]  # the script ran to the end
    p = _Table()
    p.feed(dom)
    order = [r[0][0] for r in p.rows[1:]]
    assert order == ["random", "mae", "simmim"]  # ascending top1 means: 10, 70.25, 73.17
    shot = tmp_path / "lb.png"
    subprocess.run([exe, *flags, "--window-size=900,700", f"--screenshot={shot}", f"file://{page}"],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000  # something was painted
