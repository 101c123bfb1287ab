"""Planning a suite: the stages it expands into, their dependencies and their state.

A suite becomes pretraining stages (one per encoder that is pretrained here, per seed) and
task runs (encoder x task x seed) that depend on them. Each stage is keyed by the hash of its
resolved config, so ``mimbench plan`` can tell, without running anything, what is done, what was
interrupted (a checkpoint without a summary: it will resume), what failed, and what is pending.

A sweep plans row by row (:func:`plan_sweep`); a stage that an earlier row already has (the
same resolved config) is listed once, and a row's task run that another row's run of the same
config covers says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.config import SuiteConfig
from harness.fsutil import config_hash
from harness.records import Record, SweepInfo, load_records
from harness.runner import (
    pretrain_config_for,
    pretrain_stage_dir,
    row_key,
    run_config_for,
    suite_dir,
)
from harness.sweep import SweepRow, row_encoder_name, variant_name


@dataclass
class Stage:
    """One unit of work of a suite."""

    kind: str  # "pretrain" or a task name
    encoder: str
    seed: int
    key: str  # config hash (task runs) or stage directory name (pretraining)
    state: str  # done | interrupted | failed | pending
    depends_on: list[str] = field(default_factory=list)
    detail: str = ""
    row: str = ""  # the sweep row (e.g. "depth=8"); empty outside sweeps


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
    """Every stage of ``cfg`` with its current state, in execution order.

    Args:
        cfg: The suite.
        sweep: The sweep row the suite is (its task runs are looked up by config and row).
    """
    from downstream.base import get_task
    from pretrain.engine import CHECKPOINT, ENCODER, SUMMARY

    root = suite_dir(cfg)
    records_dir = root / "records"
    latest: dict[tuple[str, tuple[str, str] | None], Record] = {}
    any_row: dict[str, Record] = {}  # ok runs of a config by any row: a sweep row reuses them
    if records_dir.is_dir():
        for r in sorted(load_records(records_dir), key=lambda r: r.finished_at or r.started_at):
            latest[(r.config_hash, row_key(r.sweep))] = r
            if r.status == "ok":
                any_row[r.config_hash] = r
    label = variant_name(sweep.tags) if sweep else ""
    stages: list[Stage] = []
    for seed in cfg.seeds:
        for entry in cfg.encoders:
            deps: list[str] = []
            if entry.pretrain is not None:
                d = pretrain_stage_dir(root, pretrain_config_for(entry, cfg, seed))
                if (d / SUMMARY).is_file() and (d / ENCODER).is_file():
                    state, detail = "done", str(d)
                elif (d / CHECKPOINT).is_file():
                    state, detail = "interrupted", f"resumes from {d / CHECKPOINT}"
                else:
                    state, detail = "pending", str(d)
                stages.append(Stage("pretrain", entry.name, seed, d.name, state, [], detail, label))
                deps = [d.name]
            for tcfg in cfg.tasks:
                task = get_task(tcfg.name)
                rc = run_config_for(entry, tcfg, cfg, seed)
                rc["task_version"] = task.version
                h = config_hash(rc)
                rec = latest.get((h, row_key(sweep)))
                if rec is None and h in any_row:
                    state, detail = "done", f"reuses {any_row[h].run_id} (same config)"
                elif rec is None:
                    state, detail = "pending", ""
                elif rec.status == "ok":
                    state, detail = "done", rec.run_id
                elif rec.status == "failed":
                    state = "failed"
                    detail = f"{rec.error.type}: {rec.error.message}" if rec.error else rec.run_id
                else:
                    state, detail = "running", rec.run_id
                stages.append(Stage(tcfg.name, row_encoder_name(entry.name, sweep), seed, h,
                                    state, deps, detail, label))
    return stages


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


def stage_dirs(cfg: SuiteConfig) -> list[Path]:
    """Pretraining stage directories of a suite (for cleaning or inspection)."""
    root = suite_dir(cfg)
    return [
        pretrain_stage_dir(root, pretrain_config_for(e, cfg, s))
        for s in cfg.seeds for e in cfg.encoders if e.pretrain is not None
    ]
