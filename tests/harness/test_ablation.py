"""Ablation tables from hand-built records: row order, mean/std against numpy, the published
join and difference, the md/csv/tex/png outputs, and the records' sweep fields."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from harness.ablation import (
    DEFAULT_PUBLISHED,
    AblationError,
    ablation_table,
    ablation_tables,
    format_csv,
    format_latex,
    format_markdown,
    load_published,
    write_ablation_reports,
)
from harness.core.records import (
    EncoderInfo,
    ErrorInfo,
    MetricInfo,
    Record,
    SweepInfo,
    TaskInfo,
    load_records,
    write_record,
)

DEPTHS = [1, 2, 4]


def _rec(
    tags,
    row,
    seed,
    metrics=None,
    task="linear_probe",
    version=1,
    name="mae_decoder_depth",
    rows=3,
    axes=None,
    status="ok",
    when="2025-01-01T00:00:00+00:00",
    encoder="enc",
    table="MAE Table 1a",
    run_id=None,
):
    metrics = metrics or {}
    info = SweepInfo(name=name, table=table, axes=axes or list(tags), row=row, rows=rows, tags=tags)
    label = ",".join(f"{k}={v}" for k, v in tags.items())
    return Record(
        run_id=run_id or f"r{row}-{task}-s{seed}-{abs(hash((label, when, encoder))) % 10**8}",
        status=status,
        started_at=when,
        finished_at=when,
        encoder=EncoderInfo(name=f"{encoder}@{label}", arch="vit_micro_32", source="pretrain"),
        task=TaskInfo(name=task, version=version),
        metrics=metrics if status == "ok" else {},
        metric_info={k: MetricInfo(higher_is_better=True) for k in (metrics or {"top1": 0})},
        seed=seed,
        sweep=info,
        tags={k: str(v) for k, v in tags.items()},
        error=ErrorInfo(type="RuntimeError", message="boom") if status == "failed" else None,
    )


def _pub_file(tmp_path, rows, metrics=None, unmatched=()):
    data = {
        "papers": {"mae": "He et al. MAE. CVPR 2022"},
        "metrics": metrics
        or {
            "ft": {"description": "fine-tune", "task": "finetune", "metric": "top1"},
            "lin": {"description": "linear", "task": "linear_probe", "metric": "top1"},
        },
        "tables": [
            {
                "id": "mae_decoder_depth",
                "paper": "mae",
                "table": "Table 1a",
                "setting": "ViT-L/16\n 800 epochs",
                "verified": True,
                "rows": [*rows, *unmatched],
            }
        ],
    }
    path = tmp_path / "pub.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def seeded():
    """3 rows x 3 seeds of linear_probe top1/top5, given in shuffled order, and the values."""
    rng = np.random.default_rng(0)
    values = {
        (d, s): (float(rng.uniform(20, 80)), float(rng.uniform(80, 100)))
        for d in DEPTHS
        for s in range(3)
    }
    recs = [
        _rec({"depth": d}, DEPTHS.index(d), s, {"top1": v[0], "top5": v[1]})
        for (d, s), v in values.items()
    ]
    order = rng.permutation(len(recs))
    return [recs[i] for i in order], values


def test_rows_follow_the_sweep_and_cells_match_numpy(seeded):
    recs, values = seeded
    t = ablation_table(recs, "mae_decoder_depth")
    assert t.rows == ["depth=1", "depth=2", "depth=4"] and t.axes == ["depth"]
    assert t.columns == ["linear_probe/top1", "linear_probe/top5"]
    for d in DEPTHS:
        for j, col in enumerate(t.columns):
            xs = np.array([values[(d, s)][j] for s in range(3)])
            assert t.mean.at[f"depth={d}", col] == pytest.approx(xs.mean(), abs=1e-12)
            assert t.std.at[f"depth={d}", col] == pytest.approx(xs.std(ddof=1), abs=1e-12)
            assert t.n.at[f"depth={d}", col] == 3
    assert t.published.isna().all().all() and t.source is None
    assert any("no published numbers for sweep 'mae_decoder_depth'" in n for n in t.notes)


def test_published_numbers_join_by_tags_with_the_difference(seeded, tmp_path):
    recs, values = seeded
    path = _pub_file(
        tmp_path,
        rows=[
            {"row": 0, "tags": {"depth": 1}, "ft": 84.8, "lin": 65.5},
            {"row": 2, "tags": {"depth": 4}, "ft": 84.9, "lin": 71.9},
            {"row": 4, "tags": {"depth": 12}, "ft": 84.4, "lin": 73.3},
        ],  # not among ours
        unmatched=[{"row": None, "tags": None, "case": "PCA", "ft": 84.6, "lin": 72.3}],
    )
    pub = load_published(path)
    t = ablation_tables(recs, pub)[0]
    assert t.columns == ["finetune/top1", "linear_probe/top1", "linear_probe/top5"]  # paper's first
    assert t.published["linear_probe/top1"].tolist()[0] == 65.5
    assert math.isnan(t.published.at["depth=2", "linear_probe/top1"])  # none published: blank
    assert t.published.at["depth=4", "finetune/top1"] == 84.9
    mean4 = np.mean([values[(4, s)][0] for s in range(3)])
    assert t.diff.at["depth=4", "linear_probe/top1"] == pytest.approx(mean4 - 71.9)
    assert math.isnan(t.diff.at["depth=4", "finetune/top1"])  # no fine-tuning run of ours
    md = format_markdown(t)
    lines = md.splitlines()
    assert lines[0] == "### MAE Table 1a: mae_decoder_depth"
    assert lines[2] == (
        "| depth | ft (paper) | lin (ours) ↑ | lin (paper) | Δ lin | linear_probe/top5 (ours) ↑ |"
    )
    row4 = lines[6].split(" | ")
    sd4 = np.std([values[(4, s)][0] for s in range(3)], ddof=1)
    assert row4[1:5] == ["84.9", f"{mean4:.2f} ± {sd4:.2f} (3)", "71.9", f"{mean4 - 71.9:+.2f}"]
    row2 = lines[5].split(" | ")
    assert row2[1] == "" and row2[3:5] == ["", ""]  # blanks, not errors
    assert "PCA (ft 84.6, lin 72.3)" in md and "He et al. MAE. CVPR 2022, Table 1a" in md
    assert "setting: ViT-L/16 800 epochs" in md


def test_the_shipped_published_file_keys_tables_by_sweep_name():
    pub = load_published(DEFAULT_PUBLISHED)
    depth = pub["mae_decoder_depth"]
    assert [m.column for m in depth.metrics] == ["finetune/top1", "linear_probe/top1"]
    assert depth.lookup({"depth": 8}) == {"row": 3, "tags": {"depth": 8}, "ft": 84.9, "lin": 73.5}
    assert [r["case"] for r in pub["mae_target"].unmatched] == ["PCA (96 largest coefficients)"]
    assert "Masked Autoencoders" in depth.paper and depth.table == "Table 1a"
    recs = [_rec({"depth": 8}, 3, 0, {"top1": 70.0}, rows=5)]
    t = ablation_tables(recs, pub)[0]
    assert t.diff.at["depth=8", "linear_probe/top1"] == pytest.approx(70.0 - 73.5)
    assert t.published.at["depth=8", "finetune/top1"] == 84.9


def test_stand_in_rows_match_by_row_index_and_not_reported_prints_na(tmp_path):
    # a tiny stand-in of SimMIM Table 3 (resolutions 2 / 4 for the paper's 6 / 12) and a row
    # the paper prints as N/A
    data = {
        "papers": {"simmim": "Xie et al. SimMIM. CVPR 2022"},
        "metrics": {"ft": {"task": "finetune", "metric": "top1"}},
        "tables": [{
            "id": "simmim_resolution", "paper": "simmim", "table": "Table 3", "setting": "s",
            "verified": True, "match_by_row": True,
            "rows": [
                {"row": 0, "tags": {"resolution": 6}, "case": "6^2", "ft": 82.3},
                {"row": 1, "tags": {"resolution": 12}, "case": "12^2", "ft": "N/A"},
                {"row": 2, "tags": {"resolution": 4}, "case": "24^2", "ft": 82.8},
            ],
        }],
    }
    path = tmp_path / "pub.yaml"
    path.write_text(yaml.safe_dump(data))
    recs = [
        _rec({"resolution": r}, i, 0, {"top1": 50.0 + i}, task="finetune",
             name="simmim_resolution", rows=2, table="SimMIM Table 3")
        for i, r in enumerate((2, 4))
    ]
    t = ablation_tables(recs, load_published(path))[0]
    # by row index, even where a stand-in's values equal another paper row's (row 1's
    # {resolution: 4} is the paper's row 2; it stands for row 1, 12^2)
    assert t.cases == ["6^2", "12^2"]
    assert t.published.at["resolution=2", "finetune/top1"] == 82.3
    assert t.diff.at["resolution=2", "finetune/top1"] == pytest.approx(50.0 - 82.3)
    assert ("resolution=4", "finetune/top1") in t.not_reported
    assert any("2 row(s) matched to the paper's rows by their row index" in n for n in t.notes)
    recs[1] = _rec({"resolution": 5}, 1, 0, {"top1": 51.0}, task="finetune",
                   name="simmim_resolution", rows=2, table="SimMIM Table 3")
    t = ablation_tables(recs, load_published(path))[0]
    assert t.cases == ["6^2", "12^2"] and ("resolution=5", "finetune/top1") in t.not_reported
    md = format_markdown(t).splitlines()
    assert md[2] == "| resolution | case (paper) | ft (ours) ↑ | ft (paper) | Δ ft |"
    assert md[5] == "| 5 | 12^2 | 51.00 | N/A |  |"
    assert "& 51.00 & N/A & -- \\\\" in format_latex(t)
    data["tables"][0]["match_by_row"] = False  # without it: by tags only
    path.write_text(yaml.safe_dump(data))
    t = ablation_tables(recs, load_published(path))[0]
    assert t.cases == [None, None] and t.published.isna().all().all()
    recs[1] = _rec({"resolution": 4}, 1, 0, {"top1": 51.0}, task="finetune",
                   name="simmim_resolution", rows=2, table="SimMIM Table 3")
    t = ablation_tables(recs, load_published(path))[0]
    assert t.cases == [None, "24^2"]  # by value


def test_malformed_published_metrics_name_the_key(tmp_path):
    path = _pub_file(tmp_path, rows=[], metrics={"lin": "linear probe top-1"})
    with pytest.raises(AblationError, match=r"metrics\.lin: give the mimbench 'task' and 'metric'"):
        load_published(path)


def test_csv_holds_every_number(seeded, tmp_path):
    recs, values = seeded
    path = _pub_file(
        tmp_path,
        rows=[{"row": 1, "tags": {"depth": 2}, "lin": 70.0}],
        metrics={"lin": {"task": "linear_probe", "metric": "top1"}},
    )
    t = ablation_tables(recs, load_published(path))[0]
    frame = pd.read_csv(io.StringIO(format_csv(t)))
    assert frame["row"].tolist() == ["depth=1", "depth=2", "depth=4"]
    assert frame["tag.depth"].tolist() == DEPTHS
    m2 = np.mean([values[(2, s)][0] for s in range(3)])
    assert frame.loc[1, "linear_probe/top1/mean"] == pytest.approx(m2)
    assert frame.loc[1, "linear_probe/top1/published"] == 70.0
    assert frame.loc[1, "linear_probe/top1/diff"] == pytest.approx(m2 - 70.0)
    assert frame["linear_probe/top1/n"].tolist() == [3, 3, 3]
    assert frame["linear_probe/top1/published"].isna().tolist() == [True, False, True]


def test_latex_groups_each_metric(seeded, tmp_path):
    recs, _ = seeded
    path = _pub_file(
        tmp_path,
        rows=[{"row": 0, "tags": {"depth": 1}, "lin": 65.5}],
        metrics={"lin": {"task": "linear_probe", "metric": "top1"}},
    )
    tex = format_latex(ablation_tables(recs, load_published(path))[0])
    assert r"\multicolumn{3}{c}{lin} & \multicolumn{1}{c}{linear\_probe/top5}" in tex
    assert r"\cmidrule(lr){2-4} \cmidrule(lr){5-5}" in tex
    assert "depth & ours & paper & $\\Delta$ & ours" in tex
    body = [x for x in tex.splitlines() if x.startswith("2 &")][0]
    assert body.split(" & ")[2:4] == ["--", "--"]  # depth 2: no published number, no difference
    assert r"$\pm$" in tex
    assert r"\bottomrule" in tex and "% published:" in tex


def test_grid_tags_mapping_values_failures_and_missing_rows():
    tags = [
        {"target": {"type": t}, "on": o} for t in ("pixels", "tokens") for o in ("masked", "all")
    ]
    recs = [_rec(tg, i, 0, {"top1": 10.0 + i}, name="g", rows=5) for i, tg in enumerate(tags[:3])]
    recs.append(_rec(tags[3], 3, 0, status="failed", name="g", rows=5))
    recs.append(_rec(tags[2], 2, 1, status="failed", name="g", rows=5))  # one seed of two failed
    t = ablation_table(recs, "g")
    assert t.rows == [
        "target=pixels,on=masked",
        "target=pixels,on=all",
        "target=tokens,on=masked",
        "target=tokens,on=all",
    ]
    md = format_markdown(t)
    assert "| tokens | all | failed |" in md and "| tokens | masked | 12.00 † |" in md
    assert any("4 of the sweep's 5 rows have records" in n for n in t.notes)
    frame = pd.read_csv(io.StringIO(format_csv(t)))
    assert json.loads(frame.loc[0, "tag.target"]) == {"type": "pixels"}


def test_newest_version_and_newest_duplicate_win():
    recs = [
        _rec({"depth": 1}, 0, 0, {"top1": 1.0}, version=1),
        _rec({"depth": 1}, 0, 0, {"top1": 2.0}, version=2, when="2025-01-01T00:00:00+00:00"),
        _rec({"depth": 1}, 0, 0, {"top1": 3.0}, version=2, when="2025-02-01T00:00:00+00:00"),
        _rec({"depth": 1}, 0, 1, {"top1": 5.0}, version=2),
    ]
    t = ablation_table(recs, "mae_decoder_depth")
    assert t.mean.at["depth=1", "linear_probe/top1"] == pytest.approx(4.0)  # seeds 3.0 and 5.0
    assert t.n.at["depth=1", "linear_probe/top1"] == 2
    assert any("older version" in n for n in t.notes) and any("duplicate" in n for n in t.notes)


def test_several_encoders_get_their_own_rows():
    recs = [
        _rec({"depth": d}, i, 0, {"top1": float(i)}, encoder=e)
        for i, d in enumerate(DEPTHS)
        for e in ("b", "a")
    ]
    t = ablation_table(recs, "mae_decoder_depth")
    assert t.rows[:2] == ["depth=1 (a)", "depth=1 (b)"] and t.encoders[:2] == ["a", "b"]
    assert "| depth | encoder |" in format_markdown(t)


def test_no_records_of_the_sweep_is_a_clear_error():
    with pytest.raises(AblationError, match="no finished records of sweep 'x'"):
        ablation_table([_rec({"depth": 1}, 0, 0, {"top1": 1.0})], "x")


def test_write_reports_md_csv_tex_png(seeded, tmp_path):
    recs, _ = seeded
    rec_dir = tmp_path / "records"
    for r in recs:
        write_record(r, rec_dir)
    write_record(
        Record(
            run_id="plain",
            status="ok",
            started_at="2025-01-01T00:00:00Z",
            encoder=EncoderInfo(name="x", arch="a", source="random"),
            task=TaskInfo(name="knn", version=1),
            metrics={"top1": 1.0},
            metric_info={"top1": MetricInfo(higher_is_better=True)},
            seed=0,
        ),
        rec_dir,
    )
    paths = write_ablation_reports(rec_dir, tmp_path / "out", published=tmp_path / "missing.yaml")
    files = paths["mae_decoder_depth"]
    assert sorted(files) == ["csv", "md", "png", "tex"]
    assert all(p.parent == tmp_path / "out" / "ablation" for p in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["md"].read_text()
    assert "knn" not in md  # records outside the sweep are not in its table
    assert "missing.yaml not found" in md
    assert write_ablation_reports([recs[0].model_copy(update={"sweep": None})], tmp_path) == {}


def test_records_without_the_sweep_field_still_load(tmp_path):
    rec = _rec({"depth": 1}, 0, 0, {"top1": 1.0})
    path = write_record(rec, tmp_path)
    data = json.loads(path.read_text())
    assert data["sweep"]["tags"] == {"depth": 1} and data["sweep"]["row"] == 0
    del data["sweep"]  # a record written before the field existed
    path.write_text(json.dumps(data))
    (loaded,) = load_records(tmp_path, strict=True)
    assert loaded.sweep is None and loaded.tags == {"depth": "1"}


def test_one_sweep_on_two_datasets_is_two_tables_never_averaged():
    """Records of one sweep name run on two datasets into one records directory: each dataset
    gets its own table (before, the two runs of a row were one cell: the newest hid the other)."""
    recs = []
    for source, top1, when in (("/data/a", 10.0, "2025-01-01T00:00:00+00:00"),
                               ("/data/b", 90.0, "2025-01-02T00:00:00+00:00")):
        r = _rec({"depth": 1}, 0, 0, {"top1": top1}, when=when, run_id=f"r-{top1}")
        recs.append(r.model_copy(update={"suite": "s", "config": {"data": {"source": source}}}))
    tables = ablation_tables(recs)
    assert len(tables) == 2
    by_name = {t.name: t for t in tables}
    assert set(by_name) == {"mae_decoder_depth (s, a)", "mae_decoder_depth (s, b)"}
    assert by_name["mae_decoder_depth (s, a)"].mean.iloc[0]["linear_probe/top1"] == 10.0
    assert by_name["mae_decoder_depth (s, b)"].mean.iloc[0]["linear_probe/top1"] == 90.0
    assert all("own table" in " ".join(t.notes) for t in tables)


def test_avgdist_is_a_column_and_an_x_axis(seeded, tmp_path):
    recs, _ = seeded
    # the seeds of a row carry the same masking's AvgDist up to Monte-Carlo error
    given = {1: [10.0, 10.2, 10.4], 2: [15.0, 15.0, 15.0]}  # depth 4: none (older summaries)
    seen: dict[int, int] = {}
    with_avg = []
    for r in recs:
        d = r.sweep.tags["depth"]
        if d in given:
            i = seen.setdefault(d, 0)
            seen[d] += 1
            r = r.model_copy(update={"details": {"avgdist": {"mean": given[d][i], "stderr": 0.1}}})
        with_avg.append(r)
    t = ablation_table(with_avg, "mae_decoder_depth")
    assert t.has_avgdist and t.avgdist == [pytest.approx(10.2), 15.0, None]
    md = format_markdown(t)
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert rows["| depth"].endswith(" | AvgDist (px) |")  # the last column, after the metrics
    assert rows["| 1"].endswith(" | 10.2 |") and rows["| 4"].endswith(" |  |")
    csv = pd.read_csv(io.StringIO(format_csv(t)))
    assert csv["avgdist"].iloc[:2].tolist() == pytest.approx([10.2, 15.0])
    assert math.isnan(csv["avgdist"].iloc[2])
    assert "AvgDist (px)" in format_latex(t)
    from harness.ablation import plot_png

    path = plot_png(t, tmp_path / "t.png")
    from PIL import Image

    one_axis = plot_png(ablation_table(recs, "mae_decoder_depth"), tmp_path / "plain.png")
    assert Image.open(path).width > Image.open(one_axis).width  # a second panel column
    assert not ablation_table(recs, "mae_decoder_depth").has_avgdist
    assert "AvgDist" not in format_markdown(ablation_table(recs, "mae_decoder_depth"))
    # a sweep that does not vary the masking: every row has the same AvgDist, no column
    same = [r.model_copy(update={"details": {"avgdist": {"mean": 6.0, "stderr": 0.1}}})
            for r in recs]
    assert not ablation_table(same, "mae_decoder_depth").has_avgdist
