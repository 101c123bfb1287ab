"""Sweeps: grid and zip expansion, key paths checked against the schema, the shipped sweep files
(full size: expand and validate; tiny: pretrain), and the published numbers matched to rows."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from harness.core.config import validate_config
from harness.sweep import SweepError, expand_sweep, load_sweep, variant_name

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted(
    p for p in (ROOT / "configs" / "sweeps").glob("*.yaml") if not p.name.startswith("_")
)
TINY = sorted((ROOT / "configs" / "sweeps" / "tiny").glob("*.yaml"))

BASE = {
    "kind": "suite",
    "name": "t",
    "encoders": [
        {
            "name": "m",
            "encoder": {"arch": "vit_micro_32"},
            "pretrain": {
                "recipe": {"name": "mae", "head": {"depth": 2, "dim": 32, "num_heads": 2}}
            },
        }
    ],
    "tasks": [{"name": "linear_probe"}],
}


def _sweep(**block):
    return {**BASE, "sweep": block}


def test_grid_is_the_cartesian_product_first_axis_slowest():
    rows = expand_sweep(
        _sweep(
            prefix="encoders.0.pretrain.recipe",
            axes={"head.depth": [1, 2], "masking.ratio": [0.5, 0.75, 0.9]},
        )
    )
    assert [t for t, _ in rows] == [
        {"depth": d, "ratio": r} for d in (1, 2) for r in (0.5, 0.75, 0.9)
    ]
    _, cfg = rows[4]  # depth 2, ratio 0.75
    rec = cfg["encoders"][0]["pretrain"]["recipe"]
    assert rec["head"] == {"depth": 2, "dim": 32, "num_heads": 2} and rec["masking"] == {
        "ratio": 0.75
    }
    assert "sweep" not in cfg and "sweep" not in rows[0][1]
    assert BASE["encoders"][0]["pretrain"]["recipe"]["head"]["depth"] == 2  # the input is untouched


def test_zip_pairs_rows_and_mapping_values_merge():
    rows = expand_sweep(
        _sweep(
            mode="zip",
            prefix="encoders.0.pretrain.recipe",
            names={"target": "tgt", "loss.type": "loss"},
            axes={
                "target": [{"type": "pixels"}, {"type": "color_bins", "bins": 4}],
                "loss.type": ["l2", "cross_entropy"],
            },
        )
    )
    assert [t for t, _ in rows] == [
        {"tgt": {"type": "pixels"}, "loss": "l2"},
        {"tgt": {"type": "color_bins", "bins": 4}, "loss": "cross_entropy"},
    ]
    rec = rows[1][1]["encoders"][0]["pretrain"]["recipe"]
    assert rec["target"] == {"type": "color_bins", "bins": 4} and rec["loss"] == {
        "type": "cross_entropy"
    }
    assert rec["head"]["depth"] == 2  # the rest of the base stays
    cfg = validate_config(rows[1][1])
    assert cfg.encoders[0].pretrain.recipe.target.bins == 4


def test_no_sweep_block_is_the_config_itself():
    assert expand_sweep(BASE) == [({}, BASE)]


@pytest.mark.parametrize(
    "block,match",
    [
        ({"mdoe": "zip", "axes": {"name": [1]}}, r"sweep\.mdoe: unknown key; did you mean 'mode'"),
        ({"mode": "grdi", "axes": {"name": [1]}}, r"sweep\.mode: 'grdi'.*did you mean 'grid'"),
        ({"axes": {}}, r"sweep\.axes: give at least one"),
        ({"axes": {"name": "x"}}, r"sweep\.axes\.name: must be a non-empty list"),
        (
            {"prefix": "encoders.0.pretrain", "axes": {"recipe.maskign.ratio": [0.5]}},
            r"sweep\.axes\.recipe\.maskign\.ratio: 'encoders\.0\.pretrain\.recipe\.maskign' is not a config "
            r"key; did you mean 'masking'",
        ),
        ({"axes": {"encoders.0.pretrain.recipe.head.deepth": [1]}}, r"did you mean 'depth'"),
        (
            {"axes": {"encoder.0.name": ["x"]}},
            r"'encoder' is not a config key; did you mean 'encoders'",
        ),
        (
            {"axes": {"encoders.name": ["x"]}},
            r"'encoders\.name': 'encoders' is a list, index it by number",
        ),
        ({"axes": {"encoders.2.name": ["x"]}}, r"index 2 out of range"),
        (
            {"mode": "zip", "axes": {"seeds": [[0], [1]], "name": ["a"]}},
            r"zip mode needs lists of equal length",
        ),
        (
            {"axes": {"seeds": [[0]]}, "names": {"seed": "s"}},
            r"sweep\.names\.seed: not an axis; did you mean 'seeds'",
        ),
        (
            {"axes": {"encoders.0.pretrain.recipe.masking.ratio": [0.5, 1.5]}},
            r"(?s)sweep row ratio=1\.5.*encoders\.0\.pretrain\.recipe\.masking\.ratio",
        ),
    ],
)
def test_bad_sweeps_are_rejected_with_the_key_path(block, match):
    with pytest.raises(SweepError, match=match):
        expand_sweep(_sweep(**block))


def test_task_keys_are_checked_against_the_task_schema():
    rows = expand_sweep(_sweep(axes={"tasks.0.epochs": [1, 2]}))
    assert [c["tasks"][0]["epochs"] for _, c in rows] == [1, 2]
    with pytest.raises(
        SweepError, match=r"'tasks\.0\.epoch' is not a config key; did you mean 'epochs'"
    ):
        expand_sweep(_sweep(axes={"tasks.0.epoch": [1]}))  # the entry's name picks its schema


def test_variant_names_are_file_safe():
    assert variant_name({"depth": 8, "dim": 512}) == "depth=8,dim=512"
    assert (
        variant_name({"target": {"type": "tokens", "tokenizer": {"type": "dall_e"}}})
        == "target=tokens-dall_e"
    )
    assert variant_name({}) == "base"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweeps_expand_and_validate(path):
    rows = load_sweep(path)
    assert len(rows) >= 2
    assert len({variant_name(t) for t, _ in rows}) == len(rows)  # rows are distinguishable


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_every_full_sweep_has_a_tiny_version_with_the_same_axes(path):
    full = yaml.safe_load((path.parent.parent / path.name).read_text())
    tiny_rows, full_rows = load_sweep(path), load_sweep(path.parent.parent / path.name)
    assert [list(t) for t, _ in tiny_rows][0] == [list(t) for t, _ in full_rows][0]
    assert full["sweep"].get("mode", "grid") in ("grid", "zip")
    assert {p.name for p in TINY} == {p.name for p in SWEEPS}


def _pretrain_rows(path: Path, data: Path, out: Path, limit: int | None = None) -> list[float]:
    from harness.stages import pretrain_config_for
    from pretrain.engine import pretrain

    losses = []
    for tags, raw in load_sweep(path)[:limit]:
        raw["data"] = {"source": str(data)}
        suite = validate_config(raw)
        pcfg = pretrain_config_for(suite.encoders[0], suite, 0)
        res = pretrain(pcfg, out / path.stem / variant_name(tags), log=lambda m: None)
        assert res.steps == 2 and res.recon_path is not None
        losses.append(res.final_loss)
    return losses


@pytest.mark.parametrize("name", ["simmim_head.yaml", "mae_target.yaml"])
def test_tiny_sweeps_pretrain(tiny_imagefolder, tmp_path, name):
    losses = _pretrain_rows(ROOT / "configs" / "sweeps" / "tiny" / name, tiny_imagefolder, tmp_path)
    assert len(losses) == len(load_sweep(ROOT / "configs" / "sweeps" / "tiny" / name))
    assert all(math.isfinite(x) for x in losses), losses
    assert len(set(losses)) == len(losses), losses  # each row trained its own model


@pytest.mark.slow
@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_every_tiny_sweep_row_pretrains(tiny_imagefolder, tmp_path, path):
    _pretrain_rows(path, tiny_imagefolder, tmp_path)


def test_published_numbers_match_the_sweep_rows():
    pub = yaml.safe_load((ROOT / "results" / "published_ablations.yaml").read_text())
    assert set(pub["papers"]) == {"mae", "simmim"}
    ids = set()
    for table in pub["tables"]:
        ids.add(table["id"])
        assert table["paper"] in pub["papers"] and table["table"] and table["setting"]
        rows = load_sweep(ROOT / table["sweep"]) if table["sweep"] else []
        for row in table["rows"]:
            if row["row"] is None:
                continue
            tags, _ = rows[row["row"]]
            assert tags == row["tags"], (table["id"], row)
            if table["verified"]:
                assert "ft" in row
    assert {
        "mae_decoder_depth",
        "mae_decoder_width",
        "mae_mask_token",
        "mae_target",
        "mae_mask_sampling",
        "simmim_masking",
        "simmim_head",
        "simmim_target",
        "simmim_loss",
        "simmim_resolution",
        "simmim_bins",
    } <= ids
    depth = next(t for t in pub["tables"] if t["id"] == "mae_decoder_depth")
    assert [(r["tags"]["depth"], r["ft"], r["lin"]) for r in depth["rows"]][3] == (8, 84.9, 73.5)


SIMMIM_TABLES = {  # sweep name -> (the paper's table, published rows, N/A entries)
    "simmim_masking": ("Table 1", 29, 0),
    "simmim_head": ("Table 2 (downstream columns from Table 10)", 4, 0),
    "simmim_resolution": ("Table 3", 6, 0),
    "simmim_loss": ("Table 4", 2, 0),
    "simmim_target": ("Table 5 (downstream columns from Table 11)", 12, 2),
    "simmim_bins": ("Table 13", 18, 2),
}


def test_simmim_tables_are_verified_with_the_papers_numbering_and_na_kept_as_na():
    pub = yaml.safe_load((ROOT / "results" / "published_ablations.yaml").read_text())
    tables = {t["id"]: t for t in pub["tables"] if t["paper"] == "simmim"}
    for name, (table, n, n_na) in SIMMIM_TABLES.items():
        t = tables[name]
        assert (t["table"], t["verified"], len(t["rows"])) == (table, True, n), name
        assert sum(r["ft"] == "N/A" for r in t["rows"]) == n_na, name
        assert all(r["ft"] == "N/A" or 80 < r["ft"] < 84 for r in t["rows"]), name
        sweep = yaml.safe_load((ROOT / t["sweep"]).read_text())["sweep"]
        assert sweep["name"] == name and sweep["table"] == f"SimMIM {table.split(' (')[0]}"
    # spot checks against the reference text
    res = {r["tags"]["resolution"]: r["ft"] for r in tables["simmim_resolution"]["rows"]}
    assert res == {6: 82.3, 12: 82.7, 24: 82.8, 48: 82.7, 96: 82.8, 192: 82.8}
    bins = {(r["tags"]["resolution"], r["tags"]["bins"]): r["ft"] for r in tables["simmim_bins"]["rows"]}
    assert bins[(192, 32)] == bins[(192, 256)] == "N/A" and bins[(6, 16)] == 82.9
    head = tables["simmim_head"]["rows"][0]
    assert (head["ft"], head["inat"], head["coco_box"], head["ade_miou"]) == (82.8, 75.2, 49.9, 50.0)
    assert [r["ft"] for r in tables["simmim_lr_schedule"]["rows"]] == [82.8, 83.0, 82.9, 83.3]


@pytest.mark.parametrize("name", sorted(SIMMIM_TABLES))
def test_tiny_simmim_sweeps_stand_in_row_for_row(name):
    """The tiny sweeps' rows are matched to the paper's by index (``match_by_row``): each tiny
    row changes the same keys as the full row at its index, and no tiny row is extra."""
    full = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    tiny = load_sweep(ROOT / "configs" / "sweeps" / "tiny" / f"{name}.yaml")
    assert 0 < len(tiny) <= len(full)
    for (t, _), (f, _) in zip(tiny, full, strict=False):
        assert list(t) == list(f)
        for key in t:  # mapping values (a target, a head) keep their type
            if isinstance(f[key], dict):
                assert t[key]["type"] == f[key]["type"], (t, f)
            elif isinstance(f[key], str):
                assert t[key] == f[key], (t, f)
    assert len({variant_name(t) for t, _ in tiny}) == len(tiny)  # rows stay distinguishable


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIMMIM_TABLES))
def test_tiny_simmim_tables_run_end_to_end_beside_the_published_column(name, tmp_path, capsys):
    from harness.cli import main

    path = ROOT / "configs" / "sweeps" / "tiny" / f"{name}.yaml"
    assert main(["run", str(path), "--out", str(tmp_path)]) == 0
    suite = yaml.safe_load(path.read_text())["name"]
    md = (tmp_path / suite / "ablation" / f"{name}.md").read_text()
    assert md in capsys.readouterr().out
    head = md.splitlines()[2]
    assert "case (paper)" in head and "ft (ours) ↑ | ft (paper) | Δ ft" in head
    rows = [x for x in md.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert len(rows) == len(load_sweep(path))
    pub = next(t for t in yaml.safe_load((ROOT / "results" / "published_ablations.yaml")
                                         .read_text())["tables"] if t["id"] == name)
    cells = [r.split(" | ") for r in rows]
    ft_paper = head.split(" | ").index("ft (paper)")
    assert [c[ft_paper] for c in cells] == [
        str(r["ft"]) for r in pub["rows"][: len(rows)]]  # the paper's numbers, row for row


# --------------------------------------------------------------------------- running sweeps


def _tiny_sweep(out: Path, **block) -> dict:
    """A tiny MAE suite on the synthetic dataset (two pretraining steps, a 1-epoch probe)."""
    return {
        "kind": "suite", "name": "tiny-sweep", "output_dir": str(out), "seeds": [0],
        "data": {"source": "shapes", "eval_crop_pct": 1.0,
                 "shapes": {"image_size": 32, "train_per_class": 4, "val_per_class": 2,
                            "train_scenes": 1, "val_scenes": 1}},
        "encoders": [{
            "name": "mae-micro", "encoder": {"arch": "vit_micro_32"},
            "pretrain": {
                "recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2},
                           "target": {"type": "pixels"}},
                "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "max_steps": 2,
                          "num_recon_images": 2, "log_every_steps": 1},
            },
        }],
        "tasks": [{"name": "linear_probe", "epochs": 1, "batch_size": 16, "lrs": [0.1]}],
        "sweep": block,
    }


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_sweep_rows_carry_their_place_in_the_table(tmp_path):
    from harness.sweep import sweep_rows

    raw = _tiny_sweep(tmp_path, name="dec", table="MAE Table 1a", mode="zip",
                      prefix="encoders.0.pretrain.recipe.head",
                      axes={"depth": [1, 2], "dim": [32, 64]})
    rows = sweep_rows(raw, source="s.yaml")
    assert [r.label for r in rows] == ["depth=1,dim=32", "depth=2,dim=64"]
    assert [(r.info.row, r.info.rows, r.info.tags) for r in rows] == [
        (0, 2, {"depth": 1, "dim": 32}), (1, 2, {"depth": 2, "dim": 64})]
    assert rows[1].info.name == "dec" and rows[1].info.table == "MAE Table 1a"
    assert rows[1].info.mode == "zip" and rows[1].info.axes == ["depth", "dim"]
    assert rows[1].config.encoders[0].pretrain.recipe.head.dim == 64
    assert {(r.config.output_dir, r.config.name) for r in rows} == {(str(tmp_path), "tiny-sweep")}
    # without a name, the sweep is named after the suite
    raw = _tiny_sweep(tmp_path, axes={"seeds": [[0], [1]]})
    assert sweep_rows(raw)[0].info.name == "tiny-sweep"


@pytest.mark.parametrize(
    "block,match",
    [
        ({"axes": {"output_dir": ["a", "b"]}}, r"rows would write to 2 suite directories"),
        ({"axes": {"encoders.0.pretrain.recipe.head.depth": [1, 2, 1]}},
         r"rows 0 and 2 have the same axis values \(depth=1\)"),
        ({"axes": {"encoders.0.pretrain.recipe.masking.ratio": [0.5, 1.5]}},
         r"(?s)sweep row ratio=1\.5: invalid config.*encoders\.0\.pretrain\.recipe\.masking\.ratio"),
    ],
)
def test_sweep_rows_reject_rows_that_cannot_share_a_table(tmp_path, block, match):
    from harness.sweep import sweep_rows

    with pytest.raises(SweepError, match=match):
        sweep_rows(_tiny_sweep(tmp_path, **block), source="s.yaml")


@pytest.mark.parametrize(
    "axes,path",
    [
        ({"encoders.0.pretrain.recipe.head.deepth": [1, 2]}, "encoders.0.pretrain.recipe.head.deepth"),
        ({"encoders.0.pretrain.recipe.masking.ratio": [0.5, 1.5]},
         "encoders.0.pretrain.recipe.masking.ratio"),
        ({"tasks.0.epoch": [1, 2]}, "tasks.0.epoch"),
    ],
)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_cli_rejects_a_bad_sweep_before_anything_is_written(tmp_path, capsys, axes, path, command):
    from harness.cli import main

    out = tmp_path / "runs"
    sweep = _write(tmp_path, _tiny_sweep(out, axes=axes))
    assert main([command, str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimbench: error: ") and path in err and str(sweep) in err
    assert not out.exists()  # nothing ran, nothing was written


def test_plan_lists_every_row_and_shares_identical_stages(tmp_path, capsys):
    from harness.cli import main

    # rows 0 and 2 resolve to the same config (the base head already has dim 32)
    sweep = _write(tmp_path, _tiny_sweep(tmp_path / "runs", prefix="encoders.0.pretrain.recipe",
                                         axes={"head": [{"depth": 1}, {"depth": 2},
                                                        {"depth": 1, "dim": 32}]}))
    assert main(["plan", str(sweep)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["row", "stage", "encoder"]
    body = [x.split() for x in lines[1:-2]]
    assert [(b[0], b[1]) for b in body] == [
        ("head=1", "pretrain"), ("head=1", "linear_probe"), ("head=2", "pretrain"),
        ("head=2", "linear_probe"), ("head=1-32", "linear_probe")]  # one pretraining for 2 rows
    assert body[1][2] == "mae-micro@head=1" and body[4][2] == "mae-micro@head=1-32"
    assert body[4][5] == body[1][5]  # the same stage key
    assert "same config as row head=1" in lines[-3]
    assert lines[-1] == "5 pending"


def test_run_a_sweep_end_to_end_then_report_the_ablation_table(tmp_path, capsys):
    import time

    from harness.cli import main
    from harness.core.records import load_records

    out = tmp_path / "runs"
    sweep = _write(tmp_path, _tiny_sweep(
        out, name="mae_decoder_depth", table="MAE Table 1a", prefix="encoders.0.pretrain.recipe",
        axes={"head": [{"depth": 1}, {"depth": 2}, {"depth": 1, "dim": 32}]},
        names={"head": "head"}))
    t0 = time.time()
    assert main(["run", str(sweep)]) == 0
    wall = time.time() - t0
    text = capsys.readouterr().out
    root = out / "tiny-sweep"
    records = sorted(load_records(root / "records", strict=True), key=lambda r: r.sweep.row)
    assert [r.sweep.row for r in records] == [0, 1, 2]  # one record per row
    assert [r.sweep.tags for r in records] == [
        {"head": {"depth": 1}}, {"head": {"depth": 2}}, {"head": {"depth": 1, "dim": 32}}]
    assert all(r.status == "ok" and r.sweep.name == "mae_decoder_depth" for r in records)
    assert [r.encoder.name for r in records] == [
        "mae-micro@head=1", "mae-micro@head=2", "mae-micro@head=1-32"]
    assert records[0].recipe["head"]["depth"] == 1 and records[1].recipe["head"]["depth"] == 2
    # row 2's config is row 0's: its pretraining and probe are shared, not repeated
    assert len(list((root / "pretrain").iterdir())) == 2
    assert records[2].details["reused_from"] == records[0].run_id
    assert records[2].metrics == records[0].metrics
    assert records[2].config_hash == records[0].config_hash != records[1].config_hash
    # the ablation table comes with the leaderboard
    md = (root / "ablation" / "mae_decoder_depth.md").read_text()
    assert md.startswith("### MAE Table 1a: mae_decoder_depth") and md in text
    table_rows = [x for x in md.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert [x.split(" | ")[0] for x in table_rows] == ["| 1", "| 2", "| 1-32"]
    top1 = f"{records[1].metrics['top1']:.2f}"
    assert table_rows[1].split(" | ")[1] == top1
    for kind in ("csv", "tex", "png"):
        assert (root / "ablation" / f"mae_decoder_depth.{kind}").is_file()
    assert (root / "leaderboard.md").is_file()
    # a second run finds every row done; the plan agrees
    assert main(["run", str(sweep)]) == 0
    assert capsys.readouterr().out.count("done earlier") == 3
    assert len(load_records(root / "records")) == 3
    assert main(["plan", str(sweep)]) == 0
    assert capsys.readouterr().out.strip().endswith("5 done")
    # the ablation command rebuilds the table from the records alone
    assert main(["ablation", str(root / "records"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "ablation" / "mae_decoder_depth.md").read_text() == md
    print(f"sweep of 3 rows (2 pretrainings + 2 probes): {wall:.1f}s")


@pytest.mark.slow
def test_sweep_through_submitit_local_matches_inprocess(tmp_path, capsys):
    """Every row's stages become local submitit jobs: identical stages of two rows are
    submitted once, the sharing row still gets its own tagged record, and the records and the
    ablation table equal an in-process run's."""
    import time

    from harness.cli import main
    from harness.core.records import load_records

    # rows 0 and 2 resolve to the same config: one pretraining and one probe serve both
    sweep = _write(tmp_path, _tiny_sweep(
        tmp_path / "unused", name="dec", prefix="encoders.0.pretrain.recipe",
        axes={"head": [{"depth": 1}, {"depth": 2}, {"depth": 1, "dim": 32}]},
        names={"head": "head"}))
    assert main(["run", str(sweep), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    t0 = time.time()
    assert main(["run", str(sweep), "--out", str(tmp_path / "b"),
                 "--launcher", "submitit-local", "--timeout-min", "10"]) == 0
    wall = time.time() - t0
    text = capsys.readouterr().out
    assert text.count("[launch] submitted pretraining") == 2
    assert text.count("[launch] submitted linear_probe") == 2
    assert "pretraining of mae-micro@head=1-32 seed 0: same stage as mae-micro@head=1" in text
    root = tmp_path / "b" / "tiny-sweep"
    assert len(list((root / "pretrain").iterdir())) == 2 and list((root / "jobs").iterdir())

    def rows(out):
        recs = sorted(load_records(out / "tiny-sweep" / "records", strict=True),
                      key=lambda r: r.sweep.row)
        return recs, [(r.status, r.sweep, r.tags, r.encoder.name, r.config_hash, r.metrics,
                       "reused_from" in r.details) for r in recs]

    (_, a), (rb, b) = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert len(b) == 3 and [x[-1] for x in b] == [False, False, True]
    assert rb[2].details["reused_from"] == rb[0].run_id
    for x, y in zip(a, b, strict=True):
        assert x[:5] == y[:5]
        assert x[5] == pytest.approx(y[5], abs=1e-9)
    md = (root / "ablation" / "dec.md").read_text()
    assert md in text and md == (tmp_path / "a" / "tiny-sweep" / "ablation" / "dec.md").read_text()
    print(f"sweep of 3 rows through submitit-local (2 pretraining + 2 probe jobs): {wall:.1f}s")


# --------------------------------------------------------------------------- mimbench validate


def _flat(node, path=""):
    """``{dotted.key: leaf}`` of a plain config (list items by index, empty containers leaves)."""
    if isinstance(node, dict | list) and node:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        return {k: v for key, val in items for k, v in _flat(val, f"{path}{key}.").items()}
    return {path[:-1]: node}


def _row_blocks(text):
    """``[(row index, label, {key: (old, new)})]`` parsed from validate's comment lines
    (``None`` for a key one side does not have)."""
    import json
    import re

    blocks = []
    for line in text.splitlines():
        if m := re.fullmatch(r"# row (\d+): (\S+)( \(no change\))?", line):
            blocks.append((int(m[1]), m[2], {}))
        elif m := re.fullmatch(r"#     (\S+): (.*) -> (.*)", line):
            old, new = (None if x == "(unset)" else json.loads(x) for x in (m[2], m[3]))
            blocks[-1][2][m[1]] = (old, new)
    return blocks


@pytest.mark.parametrize("path", SWEEPS + TINY, ids=lambda p: str(p.relative_to(ROOT)))
def test_validate_takes_every_shipped_sweep_and_shows_each_row(path, capsys):
    """``mimbench validate`` loads a sweep file as run / plan do: the resolved base config (the
    output is YAML), then each row's label and every resolved key it changes."""
    from harness.cli import main
    from harness.core.config import to_plain

    assert main(["validate", str(path)]) == 0
    text = capsys.readouterr().out
    base = yaml.safe_load(text)  # the rows are YAML comments: the output parses to the base
    raw = yaml.safe_load(path.read_text())
    assert base["kind"] == "suite" and "sweep" not in base and base["name"] == raw["name"]
    rows = load_sweep(path)  # expanded independently of the CLI
    blocks = _row_blocks(text)
    assert [b[0] for b in blocks] == list(range(len(rows)))
    assert [b[1] for b in blocks] == [variant_name(tags) for tags, _ in rows]
    flat_base = _flat(base)
    for (_, _, changes), (_, cfg) in zip(blocks, rows, strict=True):
        want = _flat(to_plain(validate_config(cfg)))
        diff = {k: (flat_base.get(k), want.get(k)) for k in flat_base.keys() | want.keys()
                if (k in flat_base) != (k in want) or flat_base.get(k) != want.get(k)}
        assert changes == diff
    assert len(blocks) > 1 and any(changes for _, _, changes in blocks)


def test_validate_applies_set_to_every_row_and_rejects_a_bad_row(tmp_path, capsys):
    from harness.cli import main

    sweep = _write(tmp_path, _tiny_sweep(tmp_path / "runs", prefix="encoders.0.pretrain.recipe",
                                         axes={"head.depth": [1, 2]}))
    assert main(["validate", str(sweep), "--set", "seeds=[4,5]"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["seeds"] == [4, 5]
    assert [b[1] for b in _row_blocks(text)] == ["depth=1", "depth=2"]
    assert all("seeds" not in "".join(b[2]) for b in _row_blocks(text))  # every row has them
    bad = _write(tmp_path, _tiny_sweep(tmp_path / "runs", prefix="encoders.0.pretrain.recipe",
                                       axes={"masking.ratio": [0.5, 1.5]}))
    assert main(["validate", str(bad)]) == 2  # the same row check as run and plan
    err = capsys.readouterr().err
    assert err.startswith("mimbench: error: ") and "masking.ratio" in err and "Traceback" not in err
