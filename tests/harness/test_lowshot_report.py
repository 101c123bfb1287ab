"""Low-shot and transfer records in the report: one curve per low-shot protocol (the record's
``curves`` detail), their columns and the transfer suite's mean rank in md / csv / tex / html."""

from __future__ import annotations

from test_report import record  # noqa: F401  (tests/harness on sys.path)

from harness.html_report import format_html, record_curves
from harness.leaderboard import leaderboard
from harness.report import write_report


def _low_shot(encoder, seed, knn, logreg):
    shares = [1.0, 10.0]
    r = record(encoder, seed, {f"top1_{p}_{s}": v for p, vals in (("knn", knn), ("logreg", logreg))
                               for s, v in zip(("1pct", "10pct"), vals, strict=True)},
               task="low_shot")  # fmt: skip
    r.details = {"curves": [
        {"name": p, "x": "train images labelled (%)", "y": f"{p} top-1 (%)",
         "points": [[x, y] for x, y in zip(shares, vals, strict=True)]}
        for p, vals in (("knn", knn), ("logreg", logreg))]}  # fmt: skip
    return r


def _transfer(encoder, a, b):
    r = record(encoder, 0, {"top1_knn_a": a, "top1_knn_b": b, "top1_knn_mean": (a + b) / 2},
               task="transfer")
    r.details = {"ranked": {"rank_knn_mean": ["top1_knn_a", "top1_knn_b"]}}
    return r


def test_low_shot_curves_per_protocol_and_transfer_rank_in_every_format(tmp_path):
    records = [_low_shot("mae", 0, [20.0, 40.0], [30.0, 50.0]),
               _low_shot("mae", 1, [30.0, 50.0], [40.0, 60.0]),
               _low_shot("random", 0, [10.0, 15.0], [12.0, 18.0]),
               _transfer("mae", 60.0, 30.0), _transfer("random", 50.0, 40.0)]  # fmt: skip
    lb = leaderboard(records)
    curves = {c.task: c for c in record_curves(lb, records)}
    assert sorted(curves) == ["low_shot-knn", "low_shot-logreg"]
    lines = {lb.row(label).encoder: pts for label, pts in curves["low_shot-logreg"].lines.items()}
    assert lines == {"mae": [(1.0, 35.0), (10.0, 55.0)], "random": [(1.0, 12.0), (10.0, 18.0)]}
    assert lb.mean["transfer/rank_knn_mean"].to_dict() == {"mae": 1.5, "random": 1.5}
    assert lb.header("low_shot/top1_logreg_10pct") == "low_shot/top1_logreg_10pct (%)"
    page = format_html(lb, records)
    assert 'alt="low_shot-logreg: train images labelled (%) vs logreg top-1 (%)"' in page
    rdir = tmp_path / "records"
    rdir.mkdir()
    for r in records:
        (rdir / f"{r.run_id}.json").write_text(r.model_dump_json())
    paths = write_report(rdir, tmp_path / "out")
    assert (tmp_path / "out" / "curve-low_shot-knn.png").read_bytes()[:4] == b"\x89PNG"
    assert "](curve-low_shot-logreg.png)" in paths["md"].read_text()
    for kind in ("md", "csv", "tex", "html"):
        text = paths[kind].read_text()
        assert "rank_knn_mean" in text.replace("\\_", "_") and "top1_logreg_1pct" in text.replace(
            "\\_", "_"), kind
