"""The static HTML leaderboard: content, best-cell marking, offline self-containment."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from test_report import TOP1, record, standard_records  # noqa: F401  (tests/harness on sys.path)

from harness.html_report import format_html
from harness.leaderboard import leaderboard


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


# --------------------------------------------------------------------------- issue 10


def _png(path, color):
    """Writes a small one-color PNG and returns its bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _pretrained(recipe=None, **kw):
    rec = record("mae", 0, {"top1": 50.0})
    return rec.model_copy(update={"recipe": recipe, **kw})


def test_report_from_another_directory_keeps_the_run_s_pictures(tmp_path, monkeypatch):
    from harness.core.records import write_record
    from harness.report import write_report

    run_dir, other = tmp_path / "run", tmp_path / "other"
    ours = _png(run_dir / "runs/s/pretrain/p1/recon.png", "red")
    theirs = _png(other / "runs/s/pretrain/p1/recon.png", "blue")  # another run, same name
    monkeypatch.chdir(run_dir)
    rec = _pretrained(details={"stage": "runs/s/pretrain/p1"})  # relative, as runs record it
    write_record(rec, run_dir / "runs/s/records")
    monkeypatch.chdir(other)
    paths = write_report(run_dir / "runs/s/records", tmp_path / "out")
    page = paths["html"].read_text()
    assert _b64(ours) in page and _b64(theirs) not in page


def test_old_relative_paths_resolve_against_the_record_not_the_reader(tmp_path, monkeypatch):
    from harness.core.fsutil import atomic_write_json
    from harness.report import write_report

    run_dir, other = tmp_path / "run", tmp_path / "other"
    ours = _png(run_dir / "runs/s/pretrain/p1/recon.png", "red")
    theirs = _png(other / "runs/s/pretrain/p1/recon.png", "blue")
    monkeypatch.chdir(other)

    def old_record(directory, provenance):  # written by an older mimbench: relative path kept
        rec = _pretrained(details={"stage": "runs/s/pretrain/p1"}, provenance=provenance)
        atomic_write_json(directory / f"{rec.run_id}.json", json.loads(rec.model_dump_json()))

    # with the run's cwd in its provenance
    old_record(tmp_path / "a" / "records", {"cwd": str(run_dir)})
    page = write_report(tmp_path / "a" / "records", tmp_path / "a")["html"].read_text()
    assert _b64(ours) in page and _b64(theirs) not in page
    # without: placed under the records' suite directory, never the reader's cwd
    old_record(run_dir / "runs/s/records", {})
    page = write_report(run_dir / "runs/s/records", tmp_path / "b")["html"].read_text()
    assert _b64(ours) in page and _b64(theirs) not in page
    (run_dir / "runs/s/pretrain/p1/recon.png").unlink()
    page = write_report(run_dir / "runs/s/records", tmp_path / "c")["html"].read_text()
    assert _b64(theirs) not in page


def test_html_shows_units_spread_seeds_and_origin():
    records = standard_records()
    page = format_html(leaderboard(records), records)
    p = _Table()
    p.feed(page)
    header = [c for c, _ in p.rows[0]]
    assert "linear_probe/top1 (%) ↑" in header  # default unit of top1
    assert "linear_probe/loss ↓" in header  # no unit known: none invented
    col = next(i for i, h in enumerate(header[1:]) if h.startswith("linear_probe/top1"))
    body = {r[0][0]: r[1:] for r in p.rows[1:]}
    mean, std = np.mean(TOP1['mae']), np.std(TOP1['mae'], ddof=1)
    assert body["mae"][col][0] == f"{mean:.2f} ± {std:.2f} n=3"
    assert body["random"][col][0] == "10.00 n=1"
    assert "All rows: suite smoke." in page


def test_unit_from_metric_info_wins():
    from harness.core.records import MetricInfo

    rec = record("mae", 0, {"top1": 50.0})
    rec.metric_info["top1"] = MetricInfo(higher_is_better=True, unit="pts")
    assert leaderboard([rec]).units == {"linear_probe/top1": "pts"}


def test_loss_curve_names_the_recipe_s_loss(tmp_path, monkeypatch):
    from harness import html_report

    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "loss.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 5)))
    recipe = {"name": "simmim", "target": {"type": "pixels"},
              "loss": {"type": "smooth_l1", "on": "masked", "adv_weight": 0.0}}
    rec = _pretrained(recipe=recipe, details={"stage": str(stage)})
    seen = {}
    real = html_report.loss_curve_png

    def spy(path, title, loss=None):
        seen["loss"] = loss
        return real(path, title, loss)

    monkeypatch.setattr(html_report, "loss_curve_png", spy)
    page = format_html(leaderboard([rec]), [rec])
    assert seen["loss"] == "smooth-L1 on masked patches' pixels"
    assert "smooth-L1 on masked patches&#x27; pixels" in page
    assert html_report.loss_name({"loss": {"type": "l2", "on": "all"},
                                  "target": {"type": "norm_pixels"}}) == (
        "L2 (MSE) on all patches' normalized pixels")


def test_partial_finetune_curve_averages_seeds_and_is_plotted(tmp_path):
    from harness.html_report import record_curves
    from harness.report import write_report

    def curve(encoder, seed, pts):
        r = record(encoder, seed, {f"top1_k{k}": y for k, y in pts}, task="partial_finetune")
        r.details = {"curve": {"x": "blocks fine-tuned", "y": "top-1 (%)",
                               "points": [list(p) for p in pts]}}
        return r

    records = [curve("mae", 0, [(0, 40.0), (2, 60.0)]), curve("mae", 1, [(0, 50.0), (2, 70.0)]),
               curve("random", 0, [(0, 20.0), (2, 30.0)]), *standard_records()]
    lb = leaderboard(records)
    (c,) = record_curves(lb, records)
    assert c.task == "partial_finetune" and c.x == "blocks fine-tuned"
    by_encoder = {lb.row(label).encoder: pts for label, pts in c.lines.items()}
    assert by_encoder == {"mae": [(0.0, 45.0), (2.0, 65.0)], "random": [(0.0, 20.0), (2.0, 30.0)]}
    assert {"partial_finetune/top1_k0", "partial_finetune/top1_k2"} <= set(lb.columns)
    assert lb.header("partial_finetune/top1_k2") == "partial_finetune/top1_k2 (%)"
    page = format_html(lb, records)
    assert "<h2>Curves</h2>" in page and 'alt="partial_finetune: blocks fine-tuned vs top-1 (%)"' in page
    rdir = tmp_path / "records"
    rdir.mkdir()
    for r in records:
        (rdir / f"{r.run_id}.json").write_text(r.model_dump_json())
    paths = write_report(rdir, tmp_path / "out")
    assert (tmp_path / "out" / "curve-partial_finetune.png").read_bytes()[:4] == b"\x89PNG"
    assert "](curve-partial_finetune.png)" in paths["md"].read_text()
