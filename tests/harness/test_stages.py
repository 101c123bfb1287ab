"""The stage planner (harness.stages): ``mimbench plan``, the in-process runner, the launchers
and ``mimbench status`` all use its stages, keys and directories; its checks run before any stage
does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.core.data.datasets import DatasetError
from harness.core.records import load_records
from harness.launch import SlurmOptions, launch_submitit_sweep
from harness.plan import plan_sweep
from harness.runner import run_suite, run_sweep
from harness.stages import (
    PretrainStage,
    StageFilter,
    TaskStage,
    check_plans,
    plan_stages,
    plan_sweep_stages,
    task_dir_key,
)
from harness.status import stage_status
from harness.sweep import SweepRow, sweep_rows


def _rows(data: Path, out: Path) -> list[SweepRow]:
    """Two rows that differ in mae's mask ratio: two pretrainings; random-init's kNN run has the
    same config in both rows (one run, its result reused by the other row)."""
    return sweep_rows({
        "kind": "suite", "name": "agree", "output_dir": str(out), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [
            {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
            {"name": "mae", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
                          "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                                    "max_steps": 1, "num_recon_images": 0}}},
        ],
        "tasks": [{"name": "knn", "k": 5, "extra_k": [1], "cache_features": False}],
        "sweep": {"name": "agree", "axes": {"encoders.1.pretrain.recipe.masking.ratio": [0.75, 0.5]}},
    })  # fmt: skip


def _planned(rows: list[SweepRow]) -> tuple[set[str], set[tuple[int, str]], set[str]]:
    """Pretraining directory names, (row, task key) pairs and task directory names planned."""
    pre, runs, tdirs = set(), set(), set()
    for plan in plan_sweep_stages(rows):
        for st in plan.stages():
            if isinstance(st, PretrainStage):
                pre.add(st.dir.name)
            else:
                assert isinstance(st, TaskStage)
                runs.add((plan.sweep.row, st.key))
                tdirs.add(st.dir.name)
    return pre, runs, tdirs


def _written(root: Path) -> tuple[set[str], set[tuple[int, str]]]:
    """Pretraining directories on disk and the (row, config hash) of every ok record."""
    recs = load_records(root / "records", strict=True)
    assert all(r.status == "ok" for r in recs), [r.error for r in recs]
    return {d.name for d in (root / "pretrain").iterdir()}, {(r.sweep.row, r.config_hash) for r in recs}


class _InlineJob:
    def __init__(self, job_id: int, out: Any) -> None:
        self.job_id = job_id
        self.out = out

    def result(self) -> Any:
        return self.out


class _InlineExecutor:
    """submitit's executor interface, running each job at once in this process."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    def update_parameters(self, **kwargs: Any) -> None:
        pass

    def submit(self, job: Any) -> _InlineJob:
        self.jobs.append(job)
        return _InlineJob(len(self.jobs), job())


@pytest.mark.slow
def test_plan_runner_launcher_and_status_agree_on_a_sweeps_stages(tiny_imagefolder, tmp_path,
                                                                    monkeypatch):
    rows = _rows(tiny_imagefolder, tmp_path / "inprocess")
    pre, runs, tdirs = _planned(rows)
    assert len(pre) == 2 and len(runs) == 4 and len({k for _, k in runs}) == 3  # one shared run

    shown = plan_sweep(rows)  # what `mimbench plan` prints
    assert {s.key for s in shown if s.kind == "pretrain"} == pre
    assert {s.key for s in shown if s.kind != "pretrain"} == {k for _, k in runs}
    assert {s.state for s in shown} == {"pending"}

    run_sweep(rows, log=lambda m: None)
    root = tmp_path / "inprocess" / "agree"
    assert _written(root) == (pre, runs)
    assert {d.name for d in (root / "tasks").iterdir()} == tdirs
    assert {s.state for s in plan_sweep(rows)} == {"done"}
    status = stage_status(root)
    assert {s.name for s in status if s.kind == "pretrain"} == pre
    assert {s.name for s in status if s.kind != "pretrain"} == tdirs
    assert {s.state for s in status} == {"done"}

    executor = _InlineExecutor()
    monkeypatch.setattr("harness.launch._executor", lambda kind, root, opts: executor)
    lines: list[str] = []
    launch_submitit_sweep(_rows(tiny_imagefolder, tmp_path / "jobs"), "submitit-local",
                          SlurmOptions(), log=lines.append)
    assert _written(tmp_path / "jobs" / "agree") == (pre, runs)
    assert sum("submitted pretraining" in m for m in lines) == len(pre)
    assert sum("submitted knn" in m for m in lines) == len({k for _, k in runs})
    assert len(executor.jobs) == len(pre) + len({k for _, k in runs})


def test_the_task_dir_gives_back_its_key_and_task(tiny_imagefolder, tmp_path):
    plan = plan_stages(_rows(tiny_imagefolder, tmp_path)[0].config)
    for st in plan.stages():
        if isinstance(st, TaskStage):
            key, task = task_dir_key(st.dir.name)
            assert st.key.startswith(key) and task == st.kind


def test_a_missing_dataset_fails_before_any_stage_runs(tiny_imagefolder, tmp_path):
    rows = _rows(tiny_imagefolder, tmp_path)
    plan = plan_stages(rows[0].config)
    plan.suite.data.source = str(tmp_path / "gone")
    with pytest.raises(DatasetError, match="gone"):
        check_plans([plan])
    with pytest.raises(DatasetError, match="gone"):
        run_suite(plan.suite, log=lambda m: None)
    assert not (tmp_path / "agree").exists()  # nothing pretrained, no record


def test_a_job_checks_only_its_own_stage(tiny_imagefolder, tmp_path, monkeypatch):
    rows = _rows(tiny_imagefolder, tmp_path)
    checked: list[str] = []
    from downstream.knn import KNN

    monkeypatch.setattr(KNN, "check_data", lambda self, cfg, data: checked.append(cfg.name))
    plan = plan_stages(rows[0].config)
    check_plans([plan], StageFilter(encoder="mae", pretrain_only=True))
    assert checked == []  # a pretraining job reads no task's data
    check_plans(plan_sweep_stages(rows))
    assert checked == ["knn"]  # one task config and dataset: checked once for all rows


def test_a_dense_suite_s_data_is_checked_by_its_task_not_as_an_imagefolder(tmp_path):
    from harness.core.config import validate_config
    from harness.core.data.shapes import ShapesSpec, ensure_shapes

    shapes = ensure_shapes(ShapesSpec(image_size=8, train_per_class=1, val_per_class=1,
                                      scene_size=64, train_scenes=2, val_scenes=1),
                           cache_root=tmp_path / "cache")  # fmt: skip
    coco = shapes / "coco"
    suite = validate_config({
        "kind": "suite", "name": "dense", "output_dir": str(tmp_path / "out"), "seeds": [0],
        "data": {"source": str(coco)},
        "encoders": [{"name": "random-init", "encoder": {"arch": "vit_micro_32"}}],
        "tasks": [{"name": "detection"}],
    })  # fmt: skip
    check_plans([plan_stages(suite)])  # a COCO root: no train/ and val/ class folders needed
    (coco / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match="instances_val2017.json is missing"):
        check_plans([plan_stages(suite)])
