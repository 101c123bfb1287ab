"""``mimbench plan``: running / interrupted from stage locks, for tasks as for pretraining, and a
task whose pretraining failed is blocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml

from harness.cli import main
from harness.core.config import validate_config
from harness.core.records import load_records
from harness.plan import plan_suite
from harness.stages import suite_dir


def _suite(data, out, batch_size=8):
    return {
        "kind": "suite", "name": "p", "output_dir": str(out), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [
            {"name": "mae", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
                          "train": {"epochs": 1, "warmup_epochs": 0.5, "batch_size": batch_size,
                                    "num_recon_images": 0}}},
            {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
        ],
        "tasks": [{"name": "linear_probe", "epochs": 1, "batch_size": 8, "lrs": [0.1]}],
    }


def _lock(stage, pid):
    stage.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": pid, "started_at": "t"}
    (stage / "stage.lock").write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _states(cfg):
    return {(s.kind, s.encoder): s for s in plan_suite(cfg)}


def test_task_and_pretraining_states_come_from_their_locks(tiny_imagefolder, tmp_path):
    cfg = validate_config(_suite(tiny_imagefolder, tmp_path))
    st = _states(cfg)
    assert {s.state for s in st.values()} == {"pending"}
    root = suite_dir(cfg)
    pre = root / "pretrain" / st[("pretrain", "mae")].key
    task = root / "tasks" / f"random-init-linear_probe-s0-{st[('linear_probe', 'random-init')].key[:10]}"
    for d in (pre, task):  # started, then killed: a log, no result, a lock naming a dead pid
        d.mkdir(parents=True)
        (d / "log.txt").write_text("2024-01-01T00:00:00+00:00 step 1/9\n")
        _lock(d, _dead_pid())
    st = _states(cfg)
    assert st[("pretrain", "mae")].state == "interrupted"
    assert st[("linear_probe", "random-init")].state == "interrupted"
    assert str(task / "log.txt") in st[("linear_probe", "random-init")].log
    for d in (pre, task):
        _lock(d, os.getpid())  # a live holder
    st = _states(cfg)
    assert st[("pretrain", "mae")].state == "running"
    assert st[("linear_probe", "random-init")].state == "running"
    for d in (pre, task):  # a clean exit removes the lock: started, unfinished = interrupted
        (d / "stage.lock").unlink()
    st = _states(cfg)
    assert st[("pretrain", "mae")].state == st[("linear_probe", "random-init")].state == "interrupted"


def test_a_failed_pretraining_blocks_its_tasks_and_the_run_exits_1(tiny_imagefolder, tmp_path, capsys):
    raw = _suite(tiny_imagefolder, tmp_path / "runs", batch_size=64)  # > 24 images: fails
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "2 stage(s) did not finish" in err
    assert "failed: pretraining of mae seed 0: ConfigError: train split has 24 images" in err
    assert "blocked: linear_probe of mae seed 0: pretraining mae-s0-" in err
    st = _states(validate_config(raw))
    assert st[("pretrain", "mae")].state == "failed"
    assert st[("linear_probe", "mae")].state == "blocked"
    assert st[("linear_probe", "random-init")].state == "done"
    recs = {r.encoder.name: r.status for r in load_records(tmp_path / "runs" / "p" / "records")}
    assert recs == {"mae": "failed", "random-init": "ok"}
    assert main(["plan", str(path)]) == 0
    assert capsys.readouterr().out.strip().endswith("1 blocked, 1 done, 1 failed")
