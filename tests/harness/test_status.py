"""``mimbench status``: stage states, progress and ETA read from what the stages write."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from harness.cli import main
from harness.core.records import EncoderInfo, ErrorInfo, MetricInfo, Record, TaskInfo, write_record
from harness.status import format_status, stage_status


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")


def _log(path: Path, lines: list[tuple[float, str]], mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{_stamp(t)} {msg}\n" for t, msg in lines))
    os.utime(path, (mtime, mtime))


def _lock(stage: Path, pid: int | None = None, host: str | None = None) -> None:
    """A stage lock file naming a holder (default: this process, alive)."""
    stage.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid or os.getpid(), "started_at": "t"}
    (stage / "stage.lock").write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(root: Path, name: str, task: str, h: str, status: str) -> None:
    write_record(
        Record(
            run_id=f"{name}-{task}-{h[:6]}", status=status, started_at=_stamp(1000.0),
            finished_at=_stamp(1010.0), duration_s=10.0,
            encoder=EncoderInfo(name=name, arch="vit_micro_32", source="random"),
            task=TaskInfo(name=task, version=1), metrics={"top1": 42.0} if status == "ok" else {},
            metric_info={"top1": MetricInfo(higher_is_better=True)}, config_hash=h, seed=0,
            error=ErrorInfo(type="ValueError", message="bad data") if status == "failed" else None,
        ),
        root / "records",
    )  # fmt: skip


def test_states_progress_and_eta(tmp_path):
    now = 10_000.0
    root = tmp_path / "suite"
    # done
    (root / "pretrain" / "mae-s0-aaaa").mkdir(parents=True)
    (root / "pretrain" / "mae-s0-aaaa" / "summary.json").write_text("{}")
    # running: 20 steps in 100 s since the last start, 60 to go -> 300 s
    _log(root / "pretrain" / "simmim-s0-bbbb" / "log.txt", [
        (now - 500, "[pretrain simmim] step 10/100 epoch 0 loss 1.0"),
        (now - 200, "[pretrain simmim] resumed at step 20/100 from x"),
        (now - 150, "[pretrain simmim] step 20/100 epoch 1 loss 0.9"),
        (now - 50, "[pretrain simmim] step 40/100 epoch 2 loss 0.8"),
    ], mtime=now - 10)  # fmt: skip
    _lock(root / "pretrain" / "simmim-s0-bbbb")
    # interrupted: a checkpoint and a log untouched for an hour
    _log(root / "pretrain" / "beit-s0-cccc" / "log.txt",
         [(now - 3600, "[pretrain beit] step 5/50 epoch 0 loss 3.0")], mtime=now - 3600)  # fmt: skip
    (root / "pretrain" / "beit-s0-cccc" / "checkpoint.pth").write_bytes(b"x")
    # tasks: one done, one failed, one running by epochs
    h_ok, h_bad, h_run = "1" * 64, "2" * 64, "3" * 64
    _record(root, "mae", "linear_probe", h_ok, "ok")
    _record(root, "mae", "finetune", h_bad, "failed")
    (root / "tasks" / f"mae-linear_probe-s0-{h_ok[:10]}").mkdir(parents=True)
    _log(root / "tasks" / f"mae-finetune-s0-{h_bad[:10]}" / "log.txt",
         [(900.0, "[finetune] step 1/10")], mtime=900.0)  # fmt: skip
    _log(root / "tasks" / f"simmim-linear_probe_faithful-s0-{h_run[:10]}" / "log.txt", [
        (now - 40, "[linear_probe_faithful] epoch 1/5 loss 2"),
        (now - 20, "[linear_probe_faithful] epoch 2/5 loss 1"),
    ], mtime=now - 20)  # fmt: skip
    _lock(root / "tasks" / f"simmim-linear_probe_faithful-s0-{h_run[:10]}")

    got = {s.name: s for s in stage_status(root, stale_s=300, now=now)}
    assert got["mae-s0-aaaa"].state == "done"
    run = got["simmim-s0-bbbb"]
    assert (run.state, run.done, run.total, run.unit) == ("running", 40, 100, "step")
    assert abs(run.eta_s - 60 * 100 / 20) < 1e-6  # the rate of the current attempt only
    assert got["beit-s0-cccc"].state == "interrupted" and got["beit-s0-cccc"].eta_s is None
    ok = got[f"mae-linear_probe-s0-{h_ok[:10]}"]
    assert (ok.kind, ok.state) == ("linear_probe", "done") and "top1 42.00" in ok.detail
    bad = got[f"mae-finetune-s0-{h_bad[:10]}"]
    assert bad.state == "failed" and "ValueError: bad data" in bad.detail
    ep = got[f"simmim-linear_probe_faithful-s0-{h_run[:10]}"]
    assert (ep.state, ep.unit, ep.done, ep.total, ep.eta_s) == ("running", "epoch", 2, 5, 60.0)
    text = format_status(list(got.values()))
    assert "[########............] step 40/100" in text and "5m00s" in text
    assert "1 failed" in text and "1 interrupted" in text and "2 running" in text


def test_status_cli_on_a_directory_and_a_suite_file(tmp_path, capsys):
    root = tmp_path / "runs" / "demo"
    _log(root / "pretrain" / "mae-s0-x" / "log.txt",
         [(time.time() - 5, "[pretrain mae] step 3/6 loss 1")], mtime=time.time())  # fmt: skip
    _lock(root / "pretrain" / "mae-s0-x")
    assert main(["status", str(root)]) == 0
    assert "running" in capsys.readouterr().out
    suite = Path(__file__).resolve().parents[2] / "configs" / "suites" / "demo.yaml"
    assert main(["status", str(suite), "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert str(root) in out and "step 3/6" in out


def test_a_killed_stage_is_interrupted_at_once_not_running(tmp_path):
    now = time.time()
    root = tmp_path / "suite"
    lines = [(now - 20, "[pretrain mae] step 1/9 loss 1"), (now - 10, "[pretrain mae] step 2/9")]
    names = ("killed", "alive", "foreign", "silent", "exited")
    for name in names:  # every log was written a second ago
        _log(root / "pretrain" / f"{name}-s0-a" / "log.txt", lines, mtime=now - 1)
        _log(root / "tasks" / f"{name}-linear_probe-s0-{'4' * 10}" / "log.txt", lines, mtime=now - 1)
    for d in [*(root / "pretrain").iterdir(), *(root / "tasks").iterdir()]:
        name = d.name.split("-")[0]
        if name == "killed":  # SIGKILLed: its lock stays, naming a dead pid
            _lock(d, pid=_dead_pid())
        elif name == "alive":
            _lock(d)
        elif name in ("foreign", "silent"):  # another host: its heartbeat tells
            _lock(d, pid=1, host="node-elsewhere")
            if name == "silent":
                os.utime(d / "stage.lock", (now - 3600, now - 3600))
    got = {(s.name.split("-")[0], s.kind): s for s in stage_status(root, stale_s=300, now=now)}
    for kind in ("pretrain", "linear_probe"):
        assert got[("killed", kind)].state == "interrupted" and got[("killed", kind)].eta_s is None
        assert got[("exited", kind)].state == "interrupted"  # no lock: nobody runs it
        assert got[("silent", kind)].state == "interrupted"
        assert got[("foreign", kind)].state == "running"
        alive = got[("alive", kind)]
        assert alive.state == "running" and alive.eta_s is not None


def test_status_of_a_standalone_pretraining_directory(tmp_path, capsys):
    out = tmp_path / "pre"
    out.mkdir()
    (out / "config.yaml").write_text("kind: pretrain\n")
    (out / "checkpoint.pth").write_bytes(b"x")
    old = time.time() - 3600
    os.utime(out / "checkpoint.pth", (old, old))
    os.utime(out / "config.yaml", (old, old))
    (st,) = stage_status(out)
    assert (st.kind, st.name, st.state) == ("pretrain", "pre", "interrupted")
    (out / "summary.json").write_text(json.dumps({"final_loss": 0.5, "steps": 12}))
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no stages yet" not in text and "1 done" in text and "loss 0.5000 after 12 steps" in text
