"""Sweeps: grid and zip expansion, key paths checked against the schema, the shipped sweep files
(full size: expand and validate; tiny: pretrain), and the published numbers matched to rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.config import validate_config
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
    from harness.runner import pretrain_config_for
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
    assert all(x == x for x in losses)  # finite


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
    } <= ids
    depth = next(t for t in pub["tables"] if t["id"] == "mae_decoder_depth")
    assert [(r["tags"]["depth"], r["ft"], r["lin"]) for r in depth["rows"]][3] == (8, 84.9, 73.5)
