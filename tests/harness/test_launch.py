"""Launchers: submitit's local executor runs the same stages as the in-process runner and gets
the same numbers."""

from __future__ import annotations

import pytest

from harness.core.config import validate_config
from harness.core.records import load_records
from harness.launch import SlurmOptions, launch_submitit
from harness.runner import StageFilter, run_suite


def _suite(data, out, name):
    return validate_config({
        "kind": "suite", "name": name, "output_dir": str(out), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [
            {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
            {"name": "mae", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
                          "train": {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 8,
                                    "num_recon_images": 0}}},
        ],
        "tasks": [{"name": "linear_probe", "epochs": 3, "batch_size": 8, "lrs": [0.1]}],
    })


def _metrics(records_dir):
    return {r.encoder.name: r.metrics for r in load_records(records_dir, strict=True)}


@pytest.mark.slow
def test_submitit_local_matches_inprocess(tiny_imagefolder, tmp_path):
    a = run_suite(_suite(tiny_imagefolder, tmp_path / "a", "s"), log=lambda m: None)
    lines: list[str] = []
    b = launch_submitit(_suite(tiny_imagefolder, tmp_path / "b", "s"), "submitit-local",
                        SlurmOptions(timeout_min=10), log=lines.append)
    assert sum("submitted" in m for m in lines) == 3  # 1 pretraining + 2 task runs
    assert list((tmp_path / "b" / "s" / "jobs").iterdir())  # submitit's job folders
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys() == {"random-init", "mae"}
    for enc in ma:
        assert ma[enc] == pytest.approx(mb[enc], abs=1e-9)


def test_stage_filter_runs_only_the_selected_stage(tiny_imagefolder, tmp_path):
    cfg = _suite(tiny_imagefolder, tmp_path, "f")
    rd = run_suite(cfg, log=lambda m: None, only=StageFilter(encoder="mae", pretrain_only=True))
    assert not load_records(rd)  # pretraining only: no task record
    assert list((tmp_path / "f" / "pretrain").glob("mae-s0-*/encoder.pth"))
    run_suite(cfg, log=lambda m: None, only=StageFilter(encoder="random-init", task="linear_probe"))
    assert [r.encoder.name for r in load_records(rd)] == ["random-init"]


@pytest.mark.slow
def test_submitit_local_task_does_not_run_after_its_pretraining_failed(tiny_imagefolder, tmp_path):
    from harness.plan import plan_suite

    cfg = _suite(tiny_imagefolder, tmp_path, "blk")
    cfg.encoders[1].pretrain.train.batch_size = 64  # more than the 24 images: the job fails
    lines: list[str] = []
    rd = launch_submitit(cfg, "submitit-local", SlurmOptions(timeout_min=10), log=lines.append)
    assert any("failed" in m for m in lines)  # the pretraining job
    recs = {r.encoder.name: r for r in load_records(rd)}
    assert recs["random-init"].status == "ok"
    blocked = recs["mae"]
    assert blocked.status == "failed" and blocked.error.type == "DependencyFailedError"
    assert blocked.error.message.startswith("blocked: pretraining mae-s0-")
    assert "ConfigError: train split has 24 images" in blocked.error.message
    assert not list((tmp_path / "blk" / "tasks").glob("mae-*"))  # the task never started
    states = {(s.kind, s.encoder): s.state for s in plan_suite(cfg)}
    assert states == {("pretrain", "mae"): "failed", ("linear_probe", "mae"): "blocked",
                      ("linear_probe", "random-init"): "done"}


class _FakeSlurm:
    """Records what each submission was given (submitit's executor interface, no cluster)."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.submitted: list[tuple] = []

    def update_parameters(self, **kw) -> None:
        self.params.update(kw)

    def submit(self, job):
        self.submitted.append((job, dict(self.params)))
        n = len(self.submitted)
        return type("Job", (), {"job_id": str(n), "result": lambda self: None})()


def test_slurm_pretraining_jobs_run_one_process_per_gpu(tiny_imagefolder, tmp_path, monkeypatch):
    """With 4 GPUs per node the pretraining job gets 4 tasks whose processes join one group
    (data-parallel, FSDP with train.fsdp); the task jobs stay one process and wait on it."""
    import harness.launch as launch

    fake = _FakeSlurm()
    monkeypatch.setattr(launch, "_executor", lambda kind, root, opts: fake)
    launch_submitit(_suite(tiny_imagefolder, tmp_path, "sl"), "slurm",
                    SlurmOptions(gpus_per_node=4), log=lambda m: None)
    (pre, pre_params), *tasks = fake.submitted
    assert pre.only.pretrain_only and pre.multiprocess and pre_params["tasks_per_node"] == 4
    assert len(tasks) == 2
    for job, params in tasks:
        assert not job.multiprocess and params["tasks_per_node"] == 1
    deps = sorted(p["slurm_additional_parameters"].get("dependency", "") for _, p in tasks)
    assert deps == ["", "afterok:1"]  # the random-init encoder's task waits for nothing
    assert launch.pretrain_tasks_per_node("submitit-local", SlurmOptions(gpus_per_node=4)) == 1
