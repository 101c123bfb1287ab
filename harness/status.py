"""``mimbench status``: live progress of every stage under a suite's output directory.

Reads only what the stages write as they go, so it works for any launcher (in-process, torchrun,
SLURM jobs on other nodes sharing the file system) and for sweeps, without the suite file:

* ``pretrain/<stage>/``: ``summary.json`` means done, ``failed.json`` failed; otherwise the
  stage log's last progress line (``step S/T``) gives how far it got;
* ``tasks/<stage>/``: the same from the task's log (``step S/T`` or ``epoch E/T``); its record in
  ``records/`` (matched by the config hash in the directory name) says done or failed.
* a standalone pretraining directory (the output of ``mimbench pretrain``: ``config.yaml`` with
  ``checkpoint.pth`` / ``summary.json``) is shown as that one stage.

Whether an unfinished stage is alive comes from its lock file (:func:`harness.core.fsutil.stage_lock`):
held by a live process on this host (its pid exists), or by a process on another host whose
heartbeat is younger than ``stale_s`` seconds: ``running``; a lock left by a dead holder, or no
lock at all on a stage that started: ``interrupted`` (killed, preempted or waiting to resume), at
once. Only a directory written without locks (a standalone ``mimbench pretrain``) falls back to
its files' modification time. The ETA extrapolates the rate between the first and the last
progress line of the current attempt.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from harness.core.fsutil import STAGE_LOCK, lock_holder_alive, read_lock
from harness.core.records import Record, load_records
from harness.stages import KEY_CHARS, PRETRAIN_DIR, PRETRAIN_FAILED, TASKS_DIR, task_dir_key
from pretrain.engine import CHECKPOINT, ENCODER, SUMMARY

PROGRESS = re.compile(r"\b(step|epoch) (\d+)/(\d+)")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+\+00:00) ")


@dataclass
class StageStatus:
    """What one stage directory says about its progress."""

    kind: str  # "pretrain" or the task name
    name: str  # directory name
    state: str  # done | running | interrupted | failed | pending
    done: int | None = None  # steps (or epochs) done
    total: int | None = None
    unit: str = "step"
    eta_s: float | None = None
    detail: str = ""

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.done is not None and self.total else None


def _progress(log: Path) -> tuple[int, int, str, float | None] | None:
    """(done, total, unit, eta seconds) from a stage log's progress lines, or None."""
    if not log.is_file():
        return None
    points: list[tuple[float, int, int, str]] = []
    for line in log.read_text(errors="replace").splitlines():
        if "resumed" in line or "] recipe=" in line:
            points = []  # a new attempt: its rate starts at its first step line (not startup)
            continue
        m = PROGRESS.search(line)
        s = STAMP.match(line)
        if m is None or s is None:
            continue
        t = datetime.fromisoformat(s.group(1)).timestamp()
        points.append((t, int(m.group(2)), int(m.group(3)), m.group(1)))
    if not points:
        return None
    t1, done, total, unit = points[-1]
    eta = None
    if len(points) >= 2:
        t0, done0 = points[0][0], points[0][1]
        if done > done0 and t1 > t0:
            eta = (total - done) * (t1 - t0) / (done - done0)
    return done, total, unit, eta


def _task_kind(dirname: str, records: dict[str, Record]) -> tuple[str, Record | None]:
    """Task name and record of a task stage directory (:func:`harness.stages.task_stage_dir`)."""
    key, task = task_dir_key(dirname)
    rec = records.get(key)
    if rec is not None:
        return rec.task.name, rec
    return task or "task", None


def _lock_state(d: Path, stale_s: float) -> str | None:
    """``running`` or ``interrupted`` from the stage lock in ``d``; None without a lock file."""
    info = read_lock(d / STAGE_LOCK)
    if info is None:
        return None
    return "running" if lock_holder_alive(info, stale_s) else "interrupted"


def _unfinished_state(d: Path, stale_s: float, started: bool) -> str:
    """State of a stage without a result: its lock decides; no lock: interrupted if started."""
    return _lock_state(d, stale_s) or ("interrupted" if started else "pending")


def _with_progress(st: StageStatus, log: Path) -> StageStatus:
    prog = _progress(log)
    if prog:
        st.done, st.total, st.unit, eta = prog
        st.eta_s = eta if st.state == "running" else None
    return st


PRETRAIN_FILES = (CHECKPOINT, SUMMARY, ENCODER, "loss.jsonl")


def is_standalone_pretraining(root: Path) -> bool:
    """Whether ``root`` is the output directory of one ``mimbench pretrain``."""
    return (root / "config.yaml").is_file() and any((root / f).is_file() for f in PRETRAIN_FILES) \
        and not (root / PRETRAIN_DIR).is_dir() and not (root / TASKS_DIR).is_dir()


def _pretrain_stage(d: Path, stale_s: float, now: float, locked: bool = True) -> StageStatus:
    """One pretraining directory; ``locked``: written by the suite runner (which locks)."""
    if (d / SUMMARY).is_file():
        st = StageStatus("pretrain", d.name, "done", detail=_summary_text(d / SUMMARY))
    elif _lock_state(d, stale_s) is None and (d / PRETRAIN_FAILED).is_file():
        st = StageStatus("pretrain", d.name, "failed", detail=_failure_text(d / PRETRAIN_FAILED))
    elif locked or (d / STAGE_LOCK).is_file():
        started = (d / "log.txt").is_file() or (d / CHECKPOINT).is_file()
        st = StageStatus("pretrain", d.name, _unfinished_state(d, stale_s, started))
    else:  # no lock to ask: the newest file's age says whether it is alive
        ages = [now - f.stat().st_mtime for f in d.iterdir() if f.is_file()]
        alive = bool(ages) and min(ages) < stale_s
        has_ckpt = (d / CHECKPOINT).is_file()
        st = StageStatus("pretrain", d.name, "running" if alive else
                         ("interrupted" if has_ckpt else "pending"))
    return _with_progress(st, d / "log.txt")


def _summary_text(path: Path) -> str:
    import json

    try:
        s = json.loads(path.read_text())
        return f"loss {float(s['final_loss']):.4f} after {int(s['steps'])} steps"
    except (ValueError, KeyError, TypeError):
        return ""


def _failure_text(path: Path) -> str:
    import json

    try:
        e = json.loads(path.read_text())
        return f"{e['type']}: {e['message']}"[:80]
    except (ValueError, KeyError, TypeError):
        return "failed.json unreadable"


def stage_status(root: str | Path, stale_s: float = 300.0, now: float | None = None) -> list[StageStatus]:
    """Every stage under a suite output directory ``root`` (``output_dir/name``), or the one
    stage of a standalone pretraining directory."""
    root = Path(root)
    now = time.time() if now is None else now
    if is_standalone_pretraining(root):
        return [_pretrain_stage(root, stale_s, now, locked=False)]
    out = [_pretrain_stage(d, stale_s, now) for d in sorted((root / PRETRAIN_DIR).glob("*/"))]
    records: dict[str, Record] = {}
    if (root / "records").is_dir():
        for r in sorted(load_records(root / "records"), key=lambda r: r.finished_at or r.started_at):
            records[r.config_hash[:KEY_CHARS]] = r
    for d in sorted((root / TASKS_DIR).glob("*/")):
        kind, rec = _task_kind(d.name, records)
        log = d / "log.txt"
        live = _lock_state(d, stale_s) == "running"
        if rec is not None and rec.status == "ok":
            metric = ", ".join(f"{k} {v:.2f}" for k, v in list(rec.metrics.items())[:2])
            st = StageStatus(kind, d.name, "done", detail=metric)
        elif rec is not None and rec.status == "failed" and not live and not (
            log.is_file() and log.stat().st_mtime > _ts(rec.finished_at)
        ):
            err = f"{rec.error.type}: {rec.error.message}" if rec.error else ""
            st = StageStatus(kind, d.name, "failed", detail=err[:80])
        else:  # no result (or a newer attempt than the failed one): the lock decides
            st = StageStatus(kind, d.name,
                             _unfinished_state(d, stale_s, log.is_file() or any(d.glob("*.pth"))))
        out.append(_with_progress(st, log))
    return out


def _ts(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


def _eta(s: float | None) -> str:
    if s is None:
        return ""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_status(stages: list[StageStatus], width: int = 20) -> str:
    """A table with a text progress bar per stage and a count per state."""
    rows = [("stage", "name", "state", "progress", "eta", "detail")]
    for s in stages:
        bar = ""
        if s.fraction is not None:
            fill = int(round(width * min(s.fraction, 1.0)))
            bar = f"[{'#' * fill}{'.' * (width - fill)}] {s.unit} {s.done}/{s.total}"
        rows.append((s.kind, s.name, s.state, bar, _eta(s.eta_s), s.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in stages:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines += ["", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no stages yet"]
    return "\n".join(lines)
