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

from harness.records import (
    EncoderInfo,
    ErrorInfo,
    MetricInfo,
    Record,
    TaskInfo,
    new_run_id,
    write_record,
)
from harness.report import (
    format_csv,
    format_latex,
    format_markdown,
    leaderboard,
    records_to_frame,
    write_report,
)

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


def test_newer_failure_replaces_older_success() -> None:
    records = [
        record("mae", 0, {"top1": 70.0}, finished=1),
        record("mae", 0, status="failed", finished=2),
    ]
    lb = leaderboard(records)
    assert lb.n.at["mae", "linear_probe/top1"] == 0
    assert lb.failed.at["mae", "linear_probe/top1"]


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
