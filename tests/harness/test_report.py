"""Tests for collation: the long-form frame, the leaderboard and its formats."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from harness.core.records import (
    EncoderInfo,
    ErrorInfo,
    MetricInfo,
    Record,
    TaskInfo,
    new_run_id,
    write_record,
)
from harness.leaderboard import leaderboard, records_to_frame
from harness.report import format_csv, format_latex, format_markdown, write_report

# Known numbers: top1 (higher is better) and loss (lower is better) per encoder and seed.
TOP1 = {"mae": [70.0, 71.5, 69.25], "simmim": [72.0, 73.0, 74.5], "random": [10.0]}
LOSS = {"mae": [0.5, 0.7, 0.6], "simmim": [0.9, 0.8, 0.85], "random": [2.0]}
ORIGIN = datetime(2025, 1, 1, tzinfo=timezone.utc)


def iso(minutes: int) -> str:
    """An ISO-8601 UTC timestamp ``minutes`` after a fixed origin."""
    return (ORIGIN + timedelta(minutes=minutes)).isoformat()


def record(
    encoder: str,
    seed: int,
    metrics: dict[str, float] | None = None,
    *,
    task: str = "linear_probe",
    version: int = 1,
    status: str = "ok",
    finished: int = 0,
    tags: dict[str, str] | None = None,
) -> Record:
    """A hand-made record; ``metrics`` maps name -> value (directions from the name)."""
    metrics = metrics or {}
    info = {m: MetricInfo(higher_is_better=(m != "loss")) for m in metrics}
    fields: dict[str, Any] = {
        "run_id": new_run_id(f"{encoder}-{task}-s{seed}"),
        "status": status,
        "started_at": iso(finished - 1),
        "finished_at": iso(finished),
        "encoder": EncoderInfo(name=encoder, arch="vit_tiny_patch16_224", source="random"),
        "task": TaskInfo(name=task, version=version),
        "metrics": metrics,
        "metric_info": info,
        "seed": seed,
        "suite": "smoke",
        "tags": tags or {},
    }
    if status == "failed":
        fields["error"] = ErrorInfo(type="RuntimeError", message="boom")
    return Record(**fields)


def standard_records() -> list[Record]:
    return [
        record(enc, seed, {"top1": TOP1[enc][seed], "loss": LOSS[enc][seed]})
        for enc in TOP1
        for seed in range(len(TOP1[enc]))
    ]


# --------------------------------------------------------------------------- frame


def test_records_to_frame_long_form() -> None:
    records = [
        *standard_records(),
        record("broken", 0, status="failed", tags={"mask_ratio": "0.6"}),
    ]
    frame = records_to_frame(records)
    assert len(frame) == 2 * 7 + 1
    for column in (
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
        "tag.mask_ratio",
    ):
        assert column in frame.columns
    failed = frame[frame["status"] == "failed"]
    assert len(failed) == 1
    assert failed["metric"].isna().all() and failed["value"].isna().all()
    assert failed["tag.mask_ratio"].iloc[0] == "0.6"
    mae_top1 = frame[(frame["encoder"] == "mae") & (frame["metric"] == "top1")]
    assert sorted(mae_top1["value"]) == sorted(TOP1["mae"])
    assert set(frame.loc[frame["metric"] == "loss", "higher_is_better"]) == {False}


def test_records_to_frame_empty() -> None:
    frame = records_to_frame([])
    assert frame.empty and "value" in frame.columns


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_mean_std_n_match_numpy() -> None:
    lb = leaderboard(standard_records())
    assert lb.columns == ["linear_probe/loss", "linear_probe/top1"]
    assert lb.encoders == ["mae", "random", "simmim"]
    for table, column in ((TOP1, "linear_probe/top1"), (LOSS, "linear_probe/loss")):
        for enc, values in table.items():
            assert lb.mean.at[enc, column] == pytest.approx(np.mean(values))
            assert lb.n.at[enc, column] == len(values)
            if len(values) > 1:
                assert lb.std.at[enc, column] == pytest.approx(np.std(values, ddof=1))
            else:
                assert math.isnan(lb.std.at[enc, column])
    assert lb.higher_is_better == {"linear_probe/top1": True, "linear_probe/loss": False}
    assert not lb.failed.to_numpy().any()
    assert lb.notes == []


def test_leaderboard_metric_selection() -> None:
    lb = leaderboard(standard_records(), metrics=["top1"])
    assert lb.columns == ["linear_probe/top1"]
    lb = leaderboard(standard_records(), metrics=["linear_probe/top1", "linear_probe/loss"])
    assert lb.columns == ["linear_probe/top1", "linear_probe/loss"]


def test_best_marking_respects_direction() -> None:
    lb = leaderboard(standard_records())
    assert lb.best("linear_probe/top1") == {"simmim"}
    assert lb.best("linear_probe/loss") == {"mae"}  # lower is better: the minimum
    lines = format_markdown(lb).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {
        cells[0]: dict(zip(header[1:], cells[1:], strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:5])
    }
    top1, loss = "linear_probe/top1 ↑", "linear_probe/loss ↓"
    mae_loss = f"{np.mean(LOSS['mae']):.2f} ± {np.std(LOSS['mae'], ddof=1):.2f} (3)"
    assert rows["mae"][loss] == f"**{mae_loss}**"
    assert rows["simmim"][top1].startswith("**") and not rows["mae"][top1].startswith("**")
    assert not rows["simmim"][loss].startswith("**")
    assert rows["random"][top1] == "10.00"  # single seed: mean only


def test_failed_runs_show_as_failed() -> None:
    records = [
        *standard_records(),
        record("broken", 0, status="failed"),
        record("broken", 1, status="failed"),
        record("mae", 3, status="failed"),  # one failed seed beside three ok ones
    ]
    lb = leaderboard(records)
    assert "broken" in lb.encoders
    assert lb.failed.loc["broken"].all()
    assert (lb.n.loc["broken"] == 0).all()
    assert lb.failed.at["mae", "linear_probe/top1"]
    assert lb.n.at["mae", "linear_probe/top1"] == 3
    text = format_markdown(lb)
    broken_row = next(line for line in text.splitlines() if line.startswith("| broken"))
    assert broken_row.count("failed") == 2
    assert "†" in next(line for line in text.splitlines() if line.startswith("| mae"))
    assert any("†" in note for note in lb.notes)


def test_failed_only_task_gets_a_column() -> None:
    lb = leaderboard([*standard_records(), record("mae", 0, task="knn", status="failed")])
    assert "knn" in lb.columns
    assert lb.failed.at["mae", "knn"]
    assert "failed" in format_markdown(lb)


def test_newest_task_version_wins_with_note() -> None:
    records = [
        record("mae", 0, {"top1": 10.0}, version=1),
        record("mae", 1, {"top1": 20.0}, version=1),
        record("mae", 0, {"top1": 50.0}, version=2),
        record("simmim", 0, {"top1": 30.0}, version=1),
    ]
    lb = leaderboard(records)
    assert lb.mean.at["mae", "linear_probe/top1"] == 50.0
    assert lb.n.at["mae", "linear_probe/top1"] == 1
    assert "simmim" not in lb.encoders  # its only record is of the old version
    assert any("linear_probe" in n and "v2" in n and "v1" in n for n in lb.notes)
    assert lb.notes[0] in format_markdown(lb)


def test_duplicates_keep_newest() -> None:
    records = [
        record("mae", 0, {"top1": 99.0}, finished=30),
        record("mae", 0, {"top1": 11.0}, finished=10),
        record("mae", 0, {"top1": 55.0}, finished=20),
        record("mae", 1, {"top1": 1.0}, finished=5),
    ]
    lb = leaderboard(records)
    assert lb.n.at["mae", "linear_probe/top1"] == 2
    assert lb.mean.at["mae", "linear_probe/top1"] == pytest.approx(np.mean([99.0, 1.0]))
    assert any("duplicate" in n for n in lb.notes)


def test_ok_result_beats_a_newer_failure_of_the_same_run() -> None:
    # the runner counts a run with an ok record as done; the report shows that result
    records = [
        record("mae", 0, {"top1": 70.0}, finished=1),
        record("mae", 0, status="failed", finished=2),
    ]
    lb = leaderboard(records)
    assert lb.n.at["mae", "linear_probe/top1"] == 1
    assert lb.mean.at["mae", "linear_probe/top1"] == 70.0
    assert not lb.failed.at["mae", "linear_probe/top1"]


def test_running_records_are_ignored() -> None:
    running = record("mae", 5, status="running")
    lb = leaderboard([*standard_records(), running])
    assert lb.n.at["mae", "linear_probe/top1"] == 3
    assert records_to_frame([running]).empty


def test_empty_leaderboard_formats() -> None:
    lb = leaderboard([])
    assert lb.columns == [] and lb.encoders == []
    assert format_markdown(lb).startswith("| encoder |")
    format_csv(lb)
    format_latex(lb)


# --------------------------------------------------------------------------- formats


def test_format_csv_columns_and_values() -> None:
    lb = leaderboard(standard_records())
    table = pd.read_csv(StringIO(format_csv(lb)), index_col="encoder")
    assert list(table.columns) == [
        "suite",
        "data",
        "linear_probe/loss/mean",
        "linear_probe/loss/std",
        "linear_probe/loss/n",
        "linear_probe/top1/mean",
        "linear_probe/top1/std",
        "linear_probe/top1/n",
    ]
    assert table.at["simmim", "linear_probe/top1/mean"] == pytest.approx(np.mean(TOP1["simmim"]))
    assert table.at["simmim", "linear_probe/top1/n"] == 3


def test_format_latex_booktabs_bold_and_escaping() -> None:
    lb = leaderboard(standard_records())
    tex = format_latex(lb)
    assert tex.startswith(r"\begin{tabular}{lrr}")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
        assert rule in tex
    assert r"linear\_probe/top1" in tex and "linear_probe" not in tex
    simmim_row = next(line for line in tex.splitlines() if line.startswith("simmim"))
    assert simmim_row.count(r"\textbf{") == 1
    best_top1 = f"{np.mean(TOP1['simmim']):.2f}"
    assert rf"\textbf{{{best_top1} $\pm$" in simmim_row


# --------------------------------------------------------------------------- files


def test_write_report(tmp_path: Path) -> None:
    records_dir = tmp_path / "records"
    for rec in standard_records():
        write_record(rec, records_dir / rec.encoder.name)
    paths = write_report(records_dir, tmp_path / "out")
    assert set(paths) == {"md", "csv", "tex", "html"}
    for kind, path in paths.items():
        assert path == tmp_path / "out" / f"leaderboard.{kind}"
        assert path.read_text().strip()
    assert "**" in paths["md"].read_text()
    # The tables are not records: a second report over the same tree still works.
    write_report(tmp_path, tmp_path / "out")


def test_write_report_without_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no records found under .*mimbench run"):
        write_report(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="no records found"):
        write_report(tmp_path / "missing", tmp_path / "out")


# --------------------------------------------------------------------------- rows: issue 10


def run_record(
    name: str,
    seed: int,
    top1: float,
    *,
    suite: str = "s",
    data: str = "shapes",
    checkpoint: str | None = None,
    sha256: str | None = None,
    finished: int = 0,
    status: str = "ok",
) -> Record:
    """A record as the runner writes it: config from run_config_for of a real suite."""
    from harness.core.config import validate_config
    from harness.stages import run_config_for

    entry: dict[str, Any] = {"name": name}
    if checkpoint is not None:
        entry["checkpoint"] = checkpoint
    else:
        entry["encoder"] = {"arch": "vit_micro_32"}
    suite_cfg = validate_config(
        {"kind": "suite", "name": suite, "output_dir": "runs", "seeds": [seed],
         "data": {"source": data}, "encoders": [entry], "tasks": [{"name": "linear_probe"}]},
        source="test",
    )
    rc = run_config_for(suite_cfg.encoders[0], suite_cfg.tasks[0], suite_cfg, seed)
    rc["task_version"] = 1
    fields: dict[str, Any] = {
        "run_id": new_run_id(f"{name}-linear_probe-s{seed}"),
        "status": status,
        "started_at": iso(finished - 1),
        "finished_at": iso(finished),
        "encoder": EncoderInfo(
            name=name, arch="vit_micro_32", source="checkpoint" if checkpoint else "random",
            checkpoint=checkpoint, sha256=sha256,
        ),
        "task": TaskInfo(name="linear_probe", version=1),
        "metrics": {"top1": top1} if status == "ok" else {},
        "metric_info": {"top1": MetricInfo(higher_is_better=True)},
        "config": rc,
        "seed": seed,
        "suite": suite,
    }
    if status == "failed":
        fields["error"] = ErrorInfo(type="RuntimeError", message="boom")
    return Record(**fields)


def _write_all(records: list[Record], directory: Path) -> list[Record]:
    """Writes the records as files and reads them back as a report would."""
    from harness.core.records import load_records

    for rec in records:
        write_record(rec, directory)
    return load_records(directory, strict=True)


def _md_rows(md: str) -> list[list[str]]:
    """The cells of a markdown table's body rows."""
    lines = [line for line in md.splitlines() if line.startswith("|")][2:]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_two_checkpoints_with_one_name_are_two_rows(tmp_path: Path) -> None:
    # two `mimbench eval` runs of a/encoder.pth and b/encoder.pth into one output
    sha_a, sha_b = "a" * 64, "b" * 64
    records = _write_all([
        run_record("encoder", 0, 40.0, checkpoint=str(tmp_path / "a/encoder.pth"), sha256=sha_a,
                   finished=1),
        run_record("encoder", 0, 60.0, checkpoint=str(tmp_path / "b/encoder.pth"), sha256=sha_b,
                   finished=2),
    ], tmp_path / "records")
    lb = leaderboard(records)
    assert len(lb.encoders) == 2  # nothing dropped as an "older duplicate"
    assert not any("duplicate" in n for n in lb.notes)
    by_name = {lb.row(label).encoder: label for label in lb.encoders}
    assert set(by_name) == {"encoder [aaaaaaaa]", "encoder [bbbbbbbb]"}
    assert lb.mean.at[by_name["encoder [aaaaaaaa]"], "linear_probe/top1"] == 40.0
    assert lb.mean.at[by_name["encoder [bbbbbbbb]"], "linear_probe/top1"] == 60.0
    assert any("2 different encoders are named 'encoder'" in n for n in lb.notes)
    md = format_markdown(lb)
    assert {row[0] for row in _md_rows(md)} == {"encoder [aaaaaaaa]", "encoder [bbbbbbbb]"}
    csv = pd.read_csv(StringIO(format_csv(lb)))
    assert sorted(csv["linear_probe/top1/mean"]) == [40.0, 60.0]


def test_same_checkpoint_overwritten_with_other_weights_is_two_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "encoder.pth")  # same path and config hash, other file content
    records = _write_all([
        run_record("encoder", 0, 40.0, checkpoint=path, sha256="c" * 64, finished=1),
        run_record("encoder", 0, 60.0, checkpoint=path, sha256="d" * 64, finished=2),
    ], tmp_path / "records")
    lb = leaderboard(records)
    assert sorted(lb.mean["linear_probe/top1"]) == [40.0, 60.0]


def test_one_encoder_on_two_datasets_is_two_rows(tmp_path: Path) -> None:
    records = _write_all([
        run_record("mae", 0, 30.0, data="shapes"),
        run_record("mae", 0, 70.0, data=str(tmp_path / "imagenet-mini")),
        run_record("mae", 1, 72.0, data=str(tmp_path / "imagenet-mini")),
    ], tmp_path / "records")
    lb = leaderboard(records)
    rows = {(lb.row(k).encoder, lb.row(k).data): k for k in lb.encoders}
    assert set(rows) == {("mae", "shapes"), ("mae", "imagenet-mini")}
    assert lb.mean.at[rows[("mae", "shapes")], "linear_probe/top1"] == 30.0
    assert lb.mean.at[rows[("mae", "imagenet-mini")], "linear_probe/top1"] == np.mean([70, 72])
    assert lb.n.at[rows[("mae", "imagenet-mini")], "linear_probe/top1"] == 2
    md = format_markdown(lb)
    assert md.splitlines()[0].startswith("| encoder | data | linear_probe/top1")
    assert sorted((r[0], r[1]) for r in _md_rows(md)) == [("mae", "imagenet-mini"),
                                                           ("mae", "shapes")]
    assert "suite s" in md  # shared by every row: said once
    tex = format_latex(lb)
    assert tex.startswith(r"\begin{tabular}{llr}") and "imagenet-mini" in tex


def test_two_suites_sharing_names_are_two_rows(tmp_path: Path) -> None:
    records = _write_all([
        run_record("mae", 0, 30.0, suite="small", finished=1),
        run_record("mae", 0, 50.0, suite="large", finished=2),
        run_record("simmim", 0, 40.0, suite="small", finished=3),
    ], tmp_path / "records")
    lb = leaderboard(records)
    assert len(lb.encoders) == 3
    md = format_markdown(lb)
    assert md.splitlines()[0].startswith("| encoder | suite | linear_probe/top1")
    assert sorted((r[0], r[1], r[2]) for r in _md_rows(md)) == [
        ("mae", "large", "**50.00**"), ("mae", "small", "30.00"), ("simmim", "small", "40.00")
    ]
    assert "data shapes" in md  # shared by every row: said once
    got = {(lb.row(k).encoder, lb.row(k).suite): lb.mean.at[k, "linear_probe/top1"]
           for k in lb.encoders}
    assert got == {("mae", "small"): 30.0, ("mae", "large"): 50.0, ("simmim", "small"): 40.0}
    csv = pd.read_csv(StringIO(format_csv(lb)))
    assert sorted(zip(csv["encoder"], csv["suite"], strict=True)) == [
        ("mae", "large"), ("mae", "small"), ("simmim", "small")]


def test_duplicates_are_records_of_one_run_key_and_ok_wins(tmp_path: Path) -> None:
    records = _write_all([
        run_record("mae", 0, 10.0, finished=1),
        run_record("mae", 0, 20.0, finished=2),  # the same run again: newest ok wins
        run_record("mae", 0, 0.0, finished=3, status="failed"),  # a later failure of it
        run_record("mae", 1, 40.0, finished=1),
    ], tmp_path / "records")
    lb = leaderboard(records)
    assert lb.encoders == ["mae"]
    assert lb.n.at["mae", "linear_probe/top1"] == 2
    assert lb.mean.at["mae", "linear_probe/top1"] == np.mean([20.0, 40.0])
    assert any("2 duplicate record(s) of the same run" in n for n in lb.notes)


def test_one_suite_one_dataset_table_is_unchanged(tmp_path: Path) -> None:
    records = _write_all([
        run_record("mae", 0, 35.25), run_record("random-init", 0, 18.5),
        run_record("simmim", 0, 31.75),
    ], tmp_path / "records")
    md = format_markdown(leaderboard(records))
    assert md.splitlines()[:5] == [
        "| encoder | linear_probe/top1 ↑ |",
        "| --- | ---: |",
        "| mae | **35.25** |",
        "| random-init | 18.50 |",
        "| simmim | 31.75 |",
    ]
    assert "All rows: suite s, data shapes." in md


# --------------------------------------------------------------------------- skipped records


def test_report_cli_names_a_truncated_record_once(tmp_path: Path, capsys) -> None:
    from harness.cli import main

    records_dir = tmp_path / "records"
    good = [write_record(r, records_dir) for r in standard_records()]
    cut = records_dir / "cut-in-half.json"
    text = good[0].read_text()
    cut.write_text(text[: len(text) // 2])
    assert main(["report", str(records_dir), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert both.count("cut-in-half.json") == 1, both
    assert f"mimbench: warning: skipped record {cut}: not valid JSON" in captured.err
    assert "UserWarning" not in both
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert f"skipped record {cut}: not valid JSON" in md
    assert "cut-in-half.json" in (tmp_path / "out" / "leaderboard.html").read_text()
    # the other records are all reported
    assert {r[0] for r in _md_rows(md)} == set(TOP1)


def test_a_winner_on_the_grid_edge_is_marked_with_a_footnote() -> None:
    from harness.html_report import format_html
    from harness.leaderboard import GRID_EDGE_MARK

    edge = {"axis": "lr", "value": 30.0, "edge": "highest", "grid": [0.1, 30.0],
            "message": "the winning head's lr 30 is the highest of the grid [0.1, 30]"}
    records = standard_records()
    mae_seed1 = next(r for r in records if r.encoder.name == "mae" and r.seed == 1)
    mae_seed1.details["grid_edge"] = [edge]
    next(r for r in records if r.encoder.name == "simmim").details["grid_edge"] = []  # interior
    lb = leaderboard(records)
    assert lb.on_grid_edge("mae", "linear_probe/top1") and lb.on_grid_edge("mae", "linear_probe/loss")
    assert not lb.on_grid_edge("simmim", "linear_probe/top1")
    assert not lb.on_grid_edge("random", "linear_probe/top1")
    md = format_markdown(lb)
    mae_row = next(line for line in md.splitlines() if line.startswith("| mae "))
    assert mae_row.count(GRID_EDGE_MARK) == 2
    simmim_row = next(line for line in md.splitlines() if line.startswith("| simmim "))
    assert GRID_EDGE_MARK not in simmim_row
    assert f"- {GRID_EDGE_MARK}: the winning head lay on an edge" in md
    assert f"- {GRID_EDGE_MARK} mae / linear_probe: {edge['message']}." in md
    csv = pd.read_csv(StringIO(format_csv(lb)), index_col=0)
    assert csv["linear_probe/top1/grid_edge"].to_dict() == {"mae": True, "random": False,
                                                            "simmim": False}
    assert r"$^\ddagger$" in format_latex(lb)
    assert "&Dagger;" in format_html(lb, records)
    clean = format_csv(leaderboard(standard_records()))
    assert "grid_edge" not in clean and GRID_EDGE_MARK not in format_markdown(
        leaderboard(standard_records()))
