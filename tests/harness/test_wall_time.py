"""The top-1 beside wall time table (`mimbench report --with-time`): its values are the
leaderboard's, its seconds the runs' (per metric where the task timed them), failed and reused
runs cost nothing."""

from __future__ import annotations

import math
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
from harness.leaderboard import leaderboard
from harness.wall_time import (
    COLUMNS,
    format_wall_time_csv,
    format_wall_time_markdown,
    wall_time_frame,
)


def rec(encoder: str, task: str, seed: int, metrics: dict[str, float], seconds: float,
        details: dict[str, Any] | None = None, status: str = "ok") -> Record:
    fields: dict[str, Any] = dict(
        run_id=new_run_id(f"{encoder}-{task}-s{seed}"), status=status,
        started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:01:00+00:00",
        duration_s=seconds, encoder=EncoderInfo(name=encoder, arch="vit_tiny_32", source="random"),
        task=TaskInfo(name=task, version=1), metrics=metrics,
        metric_info={m: MetricInfo(higher_is_better=True) for m in metrics},
        details=details or {}, seed=seed, suite="probes", config={"task": task, "seed": seed},
    )  # fmt: skip
    if status == "failed":
        fields["error"] = ErrorInfo(type="RuntimeError", message="boom")
    return Record(**fields)


def records() -> list[Record]:
    per_k = {"top1_k0": 20.0, "top1_all": 50.0}
    return [
        rec("mae", "linear_probe", 0, {"top1": 30.0, "top5": 80.0}, 12.0),
        rec("mae", "linear_probe", 1, {"top1": 34.0, "top5": 84.0}, 18.0),
        rec("mae", "knn", 0, {"top1": 25.0}, 3.0),
        rec("mae", "partial_finetune", 0, {"top1_k0": 40.0, "top1_all": 60.0}, 75.0,
            {"metric_seconds": per_k}),
        rec("random", "linear_probe", 0, {"top1": 15.0}, 11.0),
        rec("random", "knn", 0, {"top1": 13.0}, 2.5, status="failed"),
    ]


def test_values_are_the_leaderboards_and_seconds_the_runs() -> None:
    recs = records()
    frame = wall_time_frame(recs)
    assert list(frame.columns) == list(COLUMNS)
    lb = leaderboard(recs)
    got = {(r.encoder, r.task, r.metric): (r.value, r.seconds, r.n) for r in frame.itertuples()}
    # top5 is no top-1 variant; the failed kNN run of random has neither value nor seconds row
    assert set(got) == {("mae", "linear_probe", "top1"), ("mae", "knn", "top1"),
                        ("mae", "partial_finetune", "top1_k0"),
                        ("mae", "partial_finetune", "top1_all"),
                        ("random", "linear_probe", "top1")}  # fmt: skip
    for (enc, task, metric), (value, _, n) in got.items():
        assert value == lb.mean.loc[enc, f"{task}/{metric}"]
        assert n == lb.n.loc[enc, f"{task}/{metric}"]
    assert got[("mae", "linear_probe", "top1")] == (np.mean([30.0, 34.0]), np.mean([12.0, 18.0]), 2)
    # per-metric seconds where the task timed them, not the record's 75 s
    assert got[("mae", "partial_finetune", "top1_k0")][1] == 20.0
    assert got[("mae", "partial_finetune", "top1_all")][1] == 50.0
    assert got[("random", "linear_probe", "top1")][1] == 11.0


def test_reused_result_costs_nothing() -> None:
    a = rec("mae", "knn", 0, {"top1": 25.0}, 4.0)
    b = rec("mae", "knn", 1, {"top1": 27.0}, 0.0, {"reused_from": "other"})
    row = wall_time_frame([a, b]).iloc[0]
    assert (row.value, row.seconds, row.n) == (26.0, 4.0, 2)
    only_reused = wall_time_frame([b]).iloc[0]
    assert math.isnan(only_reused.seconds)


def test_markdown_side_by_side_and_csv_round_trip() -> None:
    frame = wall_time_frame(records())
    md = format_wall_time_markdown(frame)
    lines = md.splitlines()
    assert lines[0] == "| task | metric | mae | mae s | random | random s |"
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: line for line in lines[2:]
            if line.startswith("|")}  # fmt: skip
    assert rows[("linear_probe", "top1")].split("|")[3:7] == [" 32.00 ", " 15 ", " 15.00 ", " 11 "]
    assert rows[("knn", "top1")].split("|")[3:7] == [" 25.00 ", " 3.0 ", " – ", " – "]
    assert [k for k in rows] == [("knn", "top1"), ("linear_probe", "top1"),
                                 ("partial_finetune", "top1_k0"),
                                 ("partial_finetune", "top1_all")]  # fmt: skip
    back = pd.read_csv(pd.io.common.StringIO(format_wall_time_csv(frame)))
    assert list(back.columns) == list(COLUMNS) and len(back) == len(frame)
    assert np.allclose(back["seconds"], frame["seconds"])


def test_report_with_time_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from harness.cli import main

    rdir = tmp_path / "records"
    for r in records():
        write_record(r, rdir)
    assert main(["report", str(rdir), "--with-time"]) == 0
    md = (tmp_path / "wall_time.md").read_text()
    assert md == format_wall_time_markdown(wall_time_frame(records_from(rdir)))
    assert (tmp_path / "wall_time.csv").is_file() and (tmp_path / "leaderboard.md").is_file()
    assert "| task | metric | mae | mae s | random | random s |" in capsys.readouterr().out


def records_from(directory: Path) -> list[Record]:
    from harness.core.records import scan_records

    return scan_records(directory).records
