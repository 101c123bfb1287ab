"""The ``mimbench`` CLI end to end on tiny data: validate, run (and re-run), report, eval, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.core.records import load_records


def _suite(data, out):
    return {
        "kind": "suite", "name": "mini", "output_dir": str(out), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [
            {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
            {"name": "simmim", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "simmim", "masking": {"mask_patch_size": 16}},
                          "train": {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 8, "num_recon_images": 2}}},
            {"name": "mae", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
                          "train": {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 8, "num_recon_images": 2}}},
        ],
        "tasks": [{"name": "linear_probe", "epochs": 3, "batch_size": 8, "lrs": [0.1]}],
    }


def test_validate_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_suite(tmp_path, tmp_path)))
    assert main(["validate", str(path), "--set", "seeds=[3]"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["seeds"] == [3]
    assert out["encoders"][2]["pretrain"]["recipe"]["target"]["type"] == "norm_pixels"


@pytest.mark.slow
def test_run_suite_end_to_end_then_skip_on_rerun(tiny_imagefolder, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    out = tmp_path / "runs"
    path.write_text(yaml.safe_dump(_suite(tiny_imagefolder, out)))
    assert main(["plan", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("5 pending")  # 2 pretrainings + 3 probes
    assert main(["run", str(path)]) == 0
    text = capsys.readouterr().out
    for name in ("random-init", "simmim", "mae"):
        assert name in text
    records = load_records(out / "mini" / "records", strict=True)
    assert sorted(r.encoder.name for r in records) == ["mae", "random-init", "simmim"]
    assert all(r.status == "ok" and r.task.name == "linear_probe" for r in records)
    sim = next(r for r in records if r.encoder.name == "simmim")
    assert sim.encoder.source == "pretrain" and len(sim.encoder.sha256) == 64
    assert sim.recipe["masking"]["mask_patch_size"] == 16
    # the pretraining summary's AvgDist travels into the record (the ablation tables read it)
    summary = json.loads((Path(sim.details["stage"]) / "summary.json").read_text())
    assert sim.details["avgdist"] == summary["avgdist"] and summary["avgdist"]["mean"] >= 1.0
    assert sim.provenance["packages"]["torch"]
    for f in ("leaderboard.md", "leaderboard.csv", "leaderboard.tex"):
        assert (out / "mini" / f).is_file()
    assert list((out / "mini" / "pretrain").glob("simmim-*/recon.png"))
    logs = list((out / "mini").glob("*/*/log.txt"))
    assert len(logs) == 5  # one per stage: 2 pretrainings + 3 probes
    assert any("[pretrain simmim]" in p.read_text() for p in logs)
    assert main(["plan", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("5 done")
    assert main(["plan", str(path), "--set", "encoders.1.pretrain.recipe.masking.ratio=0.4"]) == 0
    assert capsys.readouterr().out.strip().endswith("3 done, 2 pending")
    # a second run does nothing new
    assert main(["run", str(path)]) == 0
    text = capsys.readouterr().out
    assert text.count("done earlier") == 3
    assert len(load_records(out / "mini" / "records")) == 3
    # changing a pretraining value reruns that encoder only
    assert main(["run", str(path), "--set", "encoders.1.pretrain.recipe.masking.ratio=0.4"]) == 0
    text = capsys.readouterr().out
    assert text.count("done earlier") == 2
    assert len(load_records(out / "mini" / "records")) == 4


@pytest.mark.slow
def test_eval_and_report_commands(tiny_imagefolder, tmp_path, capsys):
    args = ["eval", "linear", "--encoder", "random:vit_micro_32", "--data", str(tiny_imagefolder),
            "--out", str(tmp_path), "--set", "tasks.0.epochs=2", "--set", "lrs=[0.1]",
            "--set", "data.num_workers=0"]  # fmt: skip
    assert main(args) == 0
    assert "random-init" not in capsys.readouterr().out
    records = load_records(tmp_path / "eval" / "records", strict=True)
    assert len(records) == 1 and records[0].encoder.source == "random"
    # a bare key is the task's (tasks.0.lrs), a suite key keeps its place
    assert records[0].config["task"]["lrs"] == [0.1] and records[0].config["task"]["epochs"] == 2
    assert records[0].config["data"]["num_workers"] == 0
    assert main(["report", str(tmp_path / "eval" / "records"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "leaderboard.csv").is_file()


def test_user_errors_exit_2_with_one_clear_message(tmp_path, capsys):
    bad = _suite(tmp_path / "nowhere", tmp_path / "runs")
    bad["encoders"][1]["pretrain"]["recipe"]["name"] = "simmm"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'simmim'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # rejected before anything ran
    assert main(["eval", "linear", "--encoder", str(tmp_path / "missing.pth"),
                 "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and "does not exist" in err
    assert main(["eval", "linear", "--encoder", "random:vit_micro_32",
                 "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")]) == 2
    assert "nodata does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_failed_stage_is_recorded_and_the_suite_goes_on(tiny_imagefolder, tmp_path, capsys):
    suite = _suite(tiny_imagefolder, tmp_path / "runs")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    suite["encoders"] = [
        {"name": "broken", "checkpoint": str(tmp_path / "broken.pth")},
        {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
    ]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert main(["run", str(path)]) == 1  # the failure is reported, after what could run ran
    captured = capsys.readouterr()
    out = captured.out
    assert "1 stage(s) did not finish" in captured.err
    assert "failed: linear_probe of broken seed 0" in captured.err and "weights-only" in captured.err
    assert "random-init" not in captured.err
    records = {r.encoder.name: r for r in load_records(tmp_path / "runs" / "mini" / "records")}
    assert records["broken"].status == "failed" and "weights-only" in records["broken"].error.message
    assert records["random-init"].status == "ok"
    assert "failed" in out
    md = (tmp_path / "runs" / "mini" / "leaderboard.md").read_text()
    assert "broken" in md and "failed" in md


def _eval(data, out, *extra):
    return ["eval", "linear", "--data", str(data), "--out", str(out), "--set", "epochs=1",
            "--set", "lrs=[0.1]", "--set", "batch_size=8", *extra]


def test_eval_of_a_corrupt_checkpoint_exits_1_naming_the_failure(tiny_imagefolder, tmp_path, capsys):
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    assert main(_eval(tiny_imagefolder, tmp_path / "r", "--encoder", str(tmp_path / "corrupt.pth"))) == 1
    err = capsys.readouterr().err
    assert "failed: linear_probe of corrupt seed 0" in err
    (rec,) = load_records(tmp_path / "r" / "eval" / "records")
    assert rec.status == "failed" and rec.error.message[:40] in err
    assert rec.encoder.arch == "unknown (checkpoint not loaded)"  # not the schema's default preset


def test_eval_with_a_class_mismatch_exits_1_with_the_error_and_log(tiny_imagefolder, tmp_path, capsys):
    extra = tiny_imagefolder / "val" / "extra_class"
    extra.mkdir()
    (tiny_imagefolder / "val" / "class0" / "0.png").rename(extra / "0.png")
    rc = main(_eval(tiny_imagefolder, tmp_path / "r", "--encoder", "random:vit_micro_32"))
    captured = capsys.readouterr()
    assert rc != 0 and "class folders differ" in captured.err and "extra_class" in captured.err
    if rc == 1:  # found while running: the failed stage is listed with its log
        assert "failed: linear_probe of random-vit_micro_32 seed 0" in captured.err
        assert "log.txt" in captured.err


def test_eval_strict_with_an_unreadable_image_exits_1(tiny_imagefolder, tmp_path, capsys):
    (tiny_imagefolder / "train" / "class1" / "broken.png").write_bytes(b"not an image")
    args = _eval(tiny_imagefolder, tmp_path / "r", "--encoder", "random:vit_micro_32")
    assert main([*args, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "failed: linear_probe of random-vit_micro_32 seed 0" in err and "broken.png" in err
    assert main(args) == 0  # without --strict the file is skipped (and counted): no failure
