"""Stage and suite locks: a second run of what another live process runs is refused, naming the
holder; a lock left by a dead process (or a silent one on another host) is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.core.config import to_plain, validate_config
from harness.core.fsutil import LockHeldError, read_lock, stage_lock
from harness.core.records import load_records
from harness.runner import StageFilter, run_suite, suite_lock_path
from harness.stages import suite_dir

REPO = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from harness.core.fsutil import stage_lock\n"
    "with stage_lock(sys.argv[1], 'test'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(120)\n"
)


def _suite(data, out):
    return {
        "kind": "suite", "name": "locked", "output_dir": str(out), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [{"name": "random-init", "encoder": {"arch": "vit_micro_32"}}],
        "tasks": [{"name": "linear_probe", "epochs": 1, "batch_size": 8, "lrs": [0.1]}],
    }


class _Holder:
    """Another process holding the lock file ``path`` until stopped."""

    def __init__(self, path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_refuses_a_second_process_and_names_the_holder(tmp_path):
    lock = tmp_path / "stage" / "stage.lock"
    holder = _Holder(lock)
    try:
        with pytest.raises(LockHeldError) as err, stage_lock(lock, "stage X"):
            pass
        msg = str(err.value)
        assert f"pid {holder.proc.pid}" in msg and "stage X" in msg and str(lock) in msg
    finally:
        holder.stop()
    # the holder was killed (SIGKILL: its lock file stays behind): the lock is stale, taken over
    assert read_lock(lock)["pid"] == holder.proc.pid
    with stage_lock(lock, "stage X"):
        assert read_lock(lock)["pid"] == os.getpid()
    assert not lock.exists()  # released


def test_stale_locks_are_taken_over_and_fresh_foreign_ones_are_not(tmp_path):
    lock = tmp_path / "stage.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    with stage_lock(lock, "s"):  # holder died on this host
        pass
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started_at": "t0"}))
    with pytest.raises(LockHeldError, match="pid 1 on host elsewhere since t0"), stage_lock(lock, "s"):
        pass
    old = time.time() - 3600  # no heartbeat for an hour: the other host's holder is gone
    os.utime(lock, (old, old))
    with stage_lock(lock, "s", stale_s=600):
        pass
    assert not lock.exists()


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    lock = tmp_path / "stage.lock"
    with stage_lock(lock, "s", heartbeat_s=0.05):
        os.utime(lock, (0, 0))
        time.sleep(0.3)
        assert read_lock(lock)["age_s"] < 60


def test_a_second_run_of_a_running_suite_is_refused(tiny_imagefolder, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_suite(tiny_imagefolder, tmp_path / "runs")))
    cfg = validate_config(_suite(tiny_imagefolder, tmp_path / "runs"))
    holder = _Holder(suite_lock_path(suite_dir(cfg), to_plain(cfg)))
    try:
        assert main(["run", str(path)]) == 2
        err = capsys.readouterr().err
        assert "suite locked" in err and f"pid {holder.proc.pid}" in err
        assert not list((tmp_path / "runs" / "locked").glob("records/*.json"))  # nothing ran
    finally:
        holder.stop()
    assert main(["run", str(path)]) == 0  # the holder is dead: its lock is taken over
    assert [r.status for r in load_records(tmp_path / "runs" / "locked" / "records")] == ["ok"]


def test_a_stage_another_process_runs_is_refused_and_not_recorded(tiny_imagefolder, tmp_path):
    cfg = validate_config(_suite(tiny_imagefolder, tmp_path))
    from harness.plan import plan_suite

    (st,) = plan_suite(cfg)
    tdir = suite_dir(cfg) / "tasks" / f"random-init-linear_probe-s0-{st.key[:10]}"
    holder = _Holder(tdir / "stage.lock")
    only = StageFilter(task="linear_probe")  # what a launcher job runs
    try:
        with pytest.raises(LockHeldError, match=f"pid {holder.proc.pid}"):
            run_suite(cfg, log=lambda m: None, only=only)
        assert not load_records(suite_dir(cfg) / "records")
    finally:
        holder.stop()


def test_mimbench_pretrain_holds_its_directory_s_lock(tiny_imagefolder, tmp_path, capsys):
    """A standalone ``mimbench pretrain`` into a directory another process is pretraining into
    is refused (exit 2, holder named) and writes nothing; once the holder is gone it runs."""
    cfg = {"kind": "pretrain", "name": "p", "data": {"source": str(tiny_imagefolder)},
           "encoder": {"arch": "vit_micro_32"},
           "recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
           "train": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "p"
    holder = _Holder(out / "stage.lock")
    try:
        assert main(["pretrain", str(path), "--out", str(out)]) == 2
        assert f"pid {holder.proc.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["stage.lock"]  # nothing written
    finally:
        holder.stop()
    assert main(["pretrain", str(path), "--out", str(out)]) == 0
    assert (out / "summary.json").is_file() and not (out / "stage.lock").exists()
