"""``mimbench plan``: the state of every stage of a suite, without running anything.

The stages, their dependencies and keys come from the planner (:mod:`harness.stages`): a
pretraining stage per encoder that is pretrained here, per seed, and task runs (encoder x task x
seed) that depend on them, each keyed by the hash of its resolved config. A stage is

* ``done``;
* ``running``: its lock file (:func:`harness.core.fsutil.stage_lock`) names a live holder;
* ``interrupted``: started (a checkpoint or a log in its directory) but neither finished nor
  held by a live process; a pretraining resumes from its checkpoint;
* ``failed``: its last attempt failed (a task's failed record; a pretraining's ``failed.json``);
* ``blocked``: a task whose pretraining failed (it runs once that pretraining succeeds);
* ``pending``: not started.

A sweep plans row by row (:func:`plan_sweep`); a stage that an earlier row already has (the
same resolved config) is listed once, and a row's task run that another row's run of the same
config covers says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.core.config import SuiteConfig
from harness.core.fsutil import STAGE_LOCK, lock_holder_alive, read_lock
from harness.core.records import Record, SweepInfo, load_records, row_key
from harness.stages import (
    PretrainStage,
    SuitePlan,
    TaskStage,
    plan_stages,
    pretrain_done,
    read_pretrain_failure,
)
from harness.sweep import SweepRow
from pretrain.engine import CHECKPOINT


@dataclass
class Stage:
    """One unit of work of a suite."""

    kind: str  # "pretrain" or a task name
    encoder: str
    seed: int
    key: str  # config hash (task runs) or stage directory name (pretraining)
    state: str  # done | running | interrupted | failed | blocked | pending
    depends_on: list[str] = field(default_factory=list)
    detail: str = ""
    row: str = ""  # the sweep row (e.g. "depth=8"); empty outside sweeps
    log: str = ""  # the stage's log file, where it has one


UNFINISHED = ("failed", "blocked", "interrupted", "running", "pending")


def lock_is_live(stage_dir: Path) -> bool:
    """Whether a live process holds the stage lock in ``stage_dir``."""
    info = read_lock(stage_dir / STAGE_LOCK)
    return info is not None and lock_holder_alive(info)


def _pretrain_state(d: Path) -> tuple[str, str]:
    if pretrain_done(d):
        return "done", str(d)
    if lock_is_live(d):
        return "running", str(d)
    failure = read_pretrain_failure(d)
    if failure is not None:
        return "failed", failure
    if (d / CHECKPOINT).is_file():
        return "interrupted", f"resumes from {d / CHECKPOINT}"
    if (d / "log.txt").is_file():
        return "interrupted", f"started, no checkpoint yet: starts over ({d / 'log.txt'})"
    return "pending", str(d)


def _task_state(rec: Record | None, tdir: Path, reused: Record | None) -> tuple[str, str]:
    """State of a task run from its latest record and its directory (log, lock)."""
    if rec is not None and rec.status == "ok":
        return "done", rec.run_id
    if lock_is_live(tdir):
        return "running", str(tdir)
    if rec is None and reused is not None:
        return "done", f"reuses {reused.run_id} (same config)"
    if rec is not None and rec.status == "running":  # written as running, nobody runs it now
        return "interrupted", f"{rec.run_id} stopped before it finished: runs again"
    if rec is not None and rec.status == "failed":
        return "failed", f"{rec.error.type}: {rec.error.message}" if rec.error else rec.run_id
    if (tdir / "log.txt").is_file():  # started, never recorded, nobody runs it
        return "interrupted", f"started, no result: runs again ({tdir / 'log.txt'})"
    return "pending", ""


def plan_sweep(rows: list[SweepRow]) -> list[Stage]:
    """Every stage of every row of a sweep, in execution order; shared stages listed once."""
    stages: list[Stage] = []
    seen: dict[str, str] = {}  # stage key -> the row that has it first
    for row in rows:
        for st in plan_suite(row.config, sweep=row.info):
            if st.kind == "pretrain" and st.key in seen:
                continue
            if st.kind != "pretrain" and st.key in seen and st.state == "pending":
                st.detail = f"same config as row {seen[st.key]}: its result is reused"
            seen.setdefault(st.key, st.row)
            stages.append(st)
    return stages


def plan_suite(cfg: SuiteConfig, sweep: SweepInfo | None = None) -> list[Stage]:
    """Every stage of ``cfg`` (:func:`harness.stages.plan_stages`) with its current state, in
    execution order.

    Args:
        cfg: The suite.
        sweep: The sweep row the suite is (its task runs are looked up by config and row).
    """
    return stage_states(plan_stages(cfg, sweep))


def stage_states(plan: SuitePlan) -> list[Stage]:
    """The state of every stage of ``plan``, from its directory and the suite's records."""
    records_dir = plan.root / "records"
    latest: dict[tuple[str, tuple[str, str] | None], Record] = {}
    any_row: dict[str, Record] = {}  # ok runs of a config by any row: a sweep row reuses them
    if records_dir.is_dir():
        for r in sorted(load_records(records_dir), key=lambda r: r.finished_at or r.started_at):
            latest[(r.config_hash, row_key(r.sweep))] = r
            if r.status == "ok":
                any_row[r.config_hash] = r
    mine = row_key(plan.sweep)
    out: list[Stage] = []
    pre_state: dict[str, str] = {}
    for st in plan.stages():
        if isinstance(st, PretrainStage):
            state, detail = _pretrain_state(st.dir)
            pre_state[st.key] = state
            out.append(Stage("pretrain", st.entry.name, st.seed, st.key, state, [], detail,
                             plan.label, _log_of(st.dir)))
            continue
        assert isinstance(st, TaskStage)
        state, detail = _task_state(latest.get((st.key, mine)), st.dir, any_row.get(st.key))
        deps = [st.after.key] if st.after is not None else []
        if st.after is not None and pre_state[st.after.key] == "failed" and state != "done":
            state, detail = "blocked", f"pretraining {st.after.key} failed"
        out.append(Stage(st.kind, plan.encoder_name(st.entry), st.seed, st.key, state, deps,
                         detail, plan.label, _log_of(st.dir)))
    return out


def _log_of(stage_dir: Path) -> str:
    log = stage_dir / "log.txt"
    return str(log) if log.is_file() else ""


def unfinished(stages: list[Stage]) -> list[Stage]:
    """The stages not done (failed first, then blocked, interrupted, running, pending)."""
    return sorted((s for s in stages if s.state != "done"), key=lambda s: UNFINISHED.index(s.state))


def format_plan(stages: list[Stage]) -> str:
    """A plain-text table of the stages and a count per state."""
    rows: list[tuple[str, ...]] = [("stage", "encoder", "seed", "state", "key", "detail")]
    rows += [(s.kind, s.encoder, str(s.seed), s.state, s.key, s.detail[:80]) for s in stages]
    if any(s.row for s in stages):  # a sweep: which row each stage belongs to
        rows = [("row", *rows[0]), *((s.row, *r) for s, r in zip(stages, rows[1:], strict=True))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    counts: dict[str, int] = {}
    for s in stages:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)
