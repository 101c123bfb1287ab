"""Running a suite in-process: pretrain each encoder that needs it (once per config: stage
directories are keyed by the hash of their resolved config, and an interrupted pretraining
resumes), evaluate every encoder on every task and seed, write one record per run, collate.
The stages, their keys and directories come from the planner (:mod:`harness.stages`), which
also checks every checkpoint and dataset before the first stage runs.

A stage that fails leaves a failed record naming its error and the suite goes on; what finished
is skipped when the suite runs again. A pretraining that fails also leaves ``failed.json`` in its
stage directory (removed once it succeeds), so plan and status can tell its tasks are blocked.

Each stage runs under a lock file in its directory (:func:`harness.core.fsutil.stage_lock`: the
holder's host, pid and start time), and a whole suite under ``locks/suite-<hash>.lock``: a
second run of the same suite, or of a stage another process is running, is refused with a
message naming the holder; a lock whose holder died is taken over.

A sweep (:func:`run_sweep`) runs each row as a suite in one shared directory; each row's records
carry the row's :class:`~harness.core.records.SweepInfo`. Stages are keyed by their resolved config
alone, so rows whose configs are identical share them: the pretraining directory is the same,
and a task run already done for another row is not repeated: the row gets its own record holding
that run's metrics (``details.reused_from`` names it).

Under ``torchrun`` (a process group from :mod:`harness.core.distributed`), every rank first runs the
pending pretrainings together, data-parallel, then the data-parallel tasks
(:attr:`downstream.base.Task.data_parallel`: fine-tuning), rank 0 deciding what runs, holding the
locks and writing the records; then the group is closed and rank 0 alone runs the other
downstream tasks while the other ranks return (no collective spans a rank-0 task, so no rank
waits at a barrier for hours, and those tasks never see a process group).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import downstream  # noqa: F401  (registers every task and its config schema)
from downstream.base import TaskContext
from downstream.checkpoints import encoder_from_timm_name, load_checkpoint
from harness.core import distributed
from harness.core.config import TIMM_PREFIX, EncoderEntry, SuiteConfig, to_plain
from harness.core.errors import UserError
from harness.core.fsutil import (
    STAGE_LOCK,
    LockHeldError,
    atomic_write_json,
    config_hash,
    sha256_file,
    stage_lock,
)
from harness.core.provenance import collect_provenance
from harness.core.records import (
    EncoderInfo,
    ErrorInfo,
    MetricInfo,
    Record,
    SweepInfo,
    TaskInfo,
    load_records,
    new_run_id,
    row_key,
    utc_now,
    write_record,
)
from harness.core.training import pick_device
from harness.stages import (
    PRETRAIN_FAILED,
    EncoderStages,
    StageFilter,
    SuitePlan,
    TaskStage,
    check_plans,
    plan_stages,
    plan_sweep_stages,
    pretrain_config_for,
    pretrain_done,
    pretrain_stage_dir,
    read_pretrain_failure,
)
from harness.sweep import SweepRow, row_encoder_name, tag_text
from pretrain.encoders import create_encoder, load_encoder
from pretrain.encoders.arch import arch_label
from pretrain.engine import ENCODER, SUMMARY, pretrain, summary_for_record


@dataclass
class EncoderHandle:
    """An encoder ready for evaluation and what the record says about it."""

    encoder: Any  # pretrain.encoders.Encoder
    info: EncoderInfo
    recipe: dict[str, Any] | None
    extra: dict[str, Any]


def tee_log(log: Any, path: Path) -> Any:
    """A logger that also appends each line, time-stamped, to ``path`` (a stage's log file)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def _log(msg: str) -> None:
        with open(path, "a") as f:
            f.write(f"{utc_now()} {msg}\n")
        log(msg)

    return _log


def obtain_encoder(entry: EncoderEntry, suite: SuiteConfig, seed: int, root: Path, log: Any) -> EncoderHandle:
    """Pretrain (or reuse, or resume), load a checkpoint, or randomly initialize.

    The record's ``arch`` names the architecture that runs: the loaded file's recorded config
    (checked against the entry's ``encoder:`` when one is given), with every value that differs
    from its preset (:func:`pretrain.encoders.arch.arch_label`).
    """
    import torch

    if entry.pretrain is not None:
        pcfg = pretrain_config_for(entry, suite, seed)
        stage = pretrain_stage_dir(root, pcfg)
        if pretrain_done(stage):
            log(f"[suite] {entry.name}: pretraining done earlier, reusing {stage}")
        else:
            pretrain(pcfg, stage, resume=True, log=tee_log(log, stage / "log.txt"))
        path = stage / ENCODER
        enc = load_encoder(path, entry.encoder)  # refused if it is not that one
        info = EncoderInfo(name=entry.name, arch=arch_label(enc.cfg), source="pretrain",
                           checkpoint=str(path), sha256=sha256_file(path))
        return EncoderHandle(enc, info, entry.pretrain.recipe.model_dump(mode="json"),
                             _pretrain_details(stage))
    if entry.checkpoint is not None:
        if entry.checkpoint.startswith(TIMM_PREFIX):  # a timm architecture, randomly initialized
            name = entry.checkpoint.removeprefix(TIMM_PREFIX)
            torch.manual_seed(seed)
            enc, report = encoder_from_timm_name(name)
            info = EncoderInfo(name=entry.name, arch=name, source="random")
            return EncoderHandle(enc, info, None, {"import": report.summary()})
        path = Path(entry.checkpoint)
        # any supported checkpoint family (detected, or the entry's `format`); the suite's
        # encoder config is the target when given
        given = entry.encoder if "encoder" in entry.model_fields_set else None
        enc, report = load_checkpoint(path, given, entry.format, entry.allow_partial)
        log(f"[suite] {entry.name}: " + report.format())
        info = EncoderInfo(name=entry.name, arch=report.arch_label(), source="checkpoint",
                           checkpoint=str(path), sha256=report.sha256)
        return EncoderHandle(enc, info, None, {"import": report.summary()})
    torch.manual_seed(seed)
    enc = create_encoder(entry.encoder)
    info = EncoderInfo(name=entry.name, arch=arch_label(enc.cfg), source="random")
    return EncoderHandle(enc, info, None, {})


def _pretrain_details(stage: Path) -> dict[str, Any]:
    """What a pretrained encoder's records say about its pretraining: the stage directory, the
    summary's compute / non-finite blocks (:func:`pretrain.engine.summary_for_record`) and its AvgDist of its masking (SimMIM Fig. 3; absent in summaries written before it
    was stored)."""
    details: dict[str, Any] = {"stage": str(stage), "pretraining": summary_for_record(stage)}
    avgdist = json.loads((stage / SUMMARY).read_text()).get("avgdist")
    if avgdist is not None:
        details["avgdist"] = avgdist
    return details


class DependencyFailedError(UserError):
    """A task cannot run because the pretraining it depends on did not finish."""


def suite_lock_path(root: Path, obj: Any) -> Path:
    """The lock file of one suite (or sweep) config, ``obj`` its plain resolved form."""
    return root / "locks" / f"suite-{config_hash(obj)[:10]}.lock"


def _obtain(group: EncoderStages, suite: SuiteConfig, root: Path, log: Any,
            no_pretrain: bool = False) -> EncoderHandle:
    """:func:`obtain_encoder` with a pretraining run under its stage lock, its failure kept in
    the stage directory (``failed.json``), and, with ``no_pretrain``, no pretraining at all: an
    unfinished one raises :class:`DependencyFailedError`."""
    entry, seed = group.entry, group.seed
    if group.pretrain is None:
        return obtain_encoder(entry, suite, seed, root, log)
    stage = group.pretrain.dir
    if pretrain_done(stage):
        return obtain_encoder(entry, suite, seed, root, log)
    if no_pretrain:
        why = read_pretrain_failure(stage)
        raise DependencyFailedError(
            f"blocked: pretraining {stage.name} " + (f"failed ({why})" if why else "did not finish")
            + "; the task did not run"
        )
    # under torchrun every rank trains together: rank 0 holds the lock for all
    lock = (stage_lock(stage / STAGE_LOCK, f"pretraining stage {stage}")
            if distributed.get_rank() == 0 else nullcontext())
    with lock:
        try:
            handle = obtain_encoder(entry, suite, seed, root, log)
        except LockHeldError:
            raise
        except Exception as exc:
            if distributed.get_rank() == 0:
                _log_failure(stage / "log.txt", exc)
                atomic_write_json(stage / PRETRAIN_FAILED, {
                    "type": type(exc).__name__, "message": str(exc), "at": utc_now(),
                    "traceback": traceback.format_exc(),
                })
            raise
        (stage / PRETRAIN_FAILED).unlink(missing_ok=True)
    return handle


def _log_failure(path: Path, exc: BaseException) -> None:
    """Append a stage's error and traceback to its log (so every failed stage has one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{utc_now()} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")


def run_sweep(rows: list[SweepRow], log: Any = print, command: list[str] | None = None) -> Path:
    """Run every row of a sweep (see :func:`harness.sweep.sweep_rows`) into one suite directory.

    Every row is checked (:func:`harness.stages.check_plans`) before the first runs. Returns the
    records directory.
    """
    plans = plan_sweep_stages(rows)
    check_plans(plans)
    root = plans[0].root
    records_dir = root / "records"
    rest = StageFilter(data_parallel=False) if distributed.get_world_size() > 1 else StageFilter()
    if not _data_parallel_stages(lambda: [
        _run_plan(p, log, command, StageFilter(pretrain_only=True)) for p in plans
    ] + [_run_plan(p, log, command, StageFilter(data_parallel=True)) for p in plans]):
        return records_dir
    plain = [to_plain(r.config) for r in rows]
    with stage_lock(suite_lock_path(root, plain), f"sweep {rows[0].info.name} in {root}"):
        for row, plan in zip(rows, plans, strict=True):
            log(f"[sweep] {row.info.name}: row {row.info.row + 1}/{row.info.rows}: {row.label}")
            records_dir = _run_plan(plan, log, command, rest)
    return records_dir


def run_suite(cfg: SuiteConfig, log: Any = print, command: list[str] | None = None,
              only: StageFilter | None = None, sweep: SweepInfo | None = None) -> Path:
    """Run every (encoder, task, seed) of a suite, or the part ``only`` selects; return the
    records directory.

    Args:
        cfg: The suite.
        log: Where progress lines go.
        command: The command line stored in the records' provenance (default: ``sys.argv``).
        only: Run only this part of the suite (one launcher job).
        sweep: The sweep row this suite is; its records carry it, and encoders are named
            ``<encoder>@<row>`` in them (:func:`harness.sweep.row_encoder_name`).

    Raises:
        LockHeldError: Another live process runs this suite, or a stage of it, now.
    """
    return _run_plan(plan_stages(cfg, sweep), log, command, only or StageFilter())


def _run_plan(plan: SuitePlan, log: Any, command: list[str] | None, only: StageFilter) -> Path:
    """:func:`run_suite` on the suite's stages: under torchrun the pretrainings and the
    data-parallel tasks first on every rank; the selected stages checked
    (:func:`harness.stages.check_plans`), then run under the suite's lock (a launcher job: under
    its stage's lock alone)."""
    rest = only
    if not only.pretrain_only and only.data_parallel is None and distributed.get_world_size() > 1:
        if not _data_parallel_stages(lambda: (
            _run_plan(plan, log, command, replace(only, pretrain_only=True)),
            _run_plan(plan, log, command, replace(only, data_parallel=True)),
        )):  # fmt: skip
            return plan.root / "records"
        rest = replace(only, data_parallel=False)  # rank 0 alone, the group closed
    check_plans([plan], rest)
    # a launcher job (its stage's lock is enough), or the data-parallel phase (rank 0 holds each
    # stage's lock; the caller, the suite's)
    if replace(only, data_parallel=None) != StageFilter() or only.data_parallel:
        return _run_stages(plan, log, command, rest)
    with stage_lock(suite_lock_path(plan.root, to_plain(plan.suite)),
                    f"suite {plan.suite.name} in {plan.root}"):
        return _run_stages(plan, log, command, rest)


def _run_stages(plan: SuitePlan, log: Any, command: list[str] | None,  # noqa: C901
                only: StageFilter) -> Path:
    """The body of :func:`run_suite` once the suite is checked (and locked). Under a process
    group (the pretrainings and data-parallel tasks) every rank runs it: rank 0 decides what is
    left to run, holds the locks and writes the records."""
    import torch

    main = distributed.is_main()
    cfg, root, sweep = plan.suite, plan.root, plan.sweep
    records_dir = root / "records"
    if main:
        records_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 decides what runs (the other ranks follow its verdicts below)
    ok_records = [r for r in load_records(records_dir) if r.status == "ok"] if main else []
    done = {(r.config_hash, row_key(r.sweep)): r for r in ok_records}
    by_hash = {r.config_hash: r for r in ok_records}  # another row's run of the same config
    mine = row_key(sweep)
    tags = {k: tag_text(v) for k, v in sweep.tags.items()} if sweep else {}
    prov = collect_provenance(command or sys.argv)
    device = pick_device("auto")
    for group in plan.select(only):
        entry, seed = group.entry, group.seed
        if only.pretrain_only:
            if group.pretrain is not None:
                _obtain(group, cfg, root, log)
            continue
        todo: list[TaskStage] = []
        for st in group.tasks:
            if (st.key, mine) in done:
                log(f"[suite] {entry.name} / {st.kind} / seed {seed}: done earlier "
                    f"({done[(st.key, mine)].run_id}), skipped")
                continue
            if st.key in by_hash:  # identical config run for another sweep row: share it
                rec = _reused_record(by_hash[st.key], entry, seed, sweep, tags, prov)
                log(f"[suite] {rec.encoder.name} / {st.kind} / seed {seed}: same config as "
                    f"{by_hash[st.key].run_id}, its result is reused")
                _write(records_dir, rec)
                done[(st.key, mine)] = rec
                continue
            todo.append(st)
        keys = distributed.broadcast_object([st.key for st in todo])  # rank 0's verdict
        todo = [st for st in group.tasks if st.key in keys]
        if not todo:
            continue
        started = utc_now()
        t0 = time.time()
        name = plan.encoder_name(entry)
        try:
            handle = _obtain(group, cfg, root, log, only.no_pretrain)
        except LockHeldError:
            raise  # another process runs this pretraining: refuse, record nothing
        except Exception as exc:  # the encoder failed: every task of it fails, suite goes on
            log(f"[suite] {name}: FAILED to obtain encoder: {type(exc).__name__}: {exc}")
            for st in todo:
                rec = _failed_record(st, cfg, prov, started, t0, exc)
                _write(records_dir, _in_row(rec, sweep, tags))
            continue
        info = handle.info.model_copy(update={"name": name})
        for st in todo:
            tdir = st.dir
            with stage_lock(tdir / STAGE_LOCK, f"task run {tdir}") if main else nullcontext():
                if distributed.broadcast_object(  # by another process
                    main and _finished_meanwhile(records_dir, st.key, mine)
                ):
                    log(f"[suite] {name} / {st.kind} / seed {seed}: done meanwhile, skipped")
                    continue
                started = utc_now()
                t0 = time.time()
                log(f"[suite] {name} / {st.kind} / seed {seed}: running")
                try:
                    ctx = TaskContext(data=cfg.data, seed=seed, device=device, out_dir=tdir,
                                      log=tee_log(log, tdir / "log.txt") if main else _silent,
                                      inputs={s.kind: s.dir for s in st.inputs})
                    torch.manual_seed(seed)
                    result = st.task.run(handle.encoder, st.task_cfg, ctx)
                    task = st.task
                    declared = task.metric_names(st.task_cfg)
                    rec = Record(
                        run_id=new_run_id(f"{name}-{st.kind}-s{seed}"),
                        status="ok", started_at=started, finished_at=utc_now(),
                        duration_s=time.time() - t0, encoder=info, recipe=handle.recipe,
                        task=TaskInfo(name=task.name, version=task.version),
                        metrics={k: float(v) for k, v in result.metrics.items()},
                        metric_info={k: MetricInfo(higher_is_better=declared[k])
                                     for k in result.metrics},
                        details={**result.details, **handle.extra},
                        config=st.run_config, config_hash=st.key, seed=seed, suite=cfg.name,
                        provenance=prov,
                    )
                except Exception as exc:
                    log(f"[suite] {name} / {st.kind}: FAILED: {type(exc).__name__}: {exc}")
                    if main:
                        _log_failure(tdir / "log.txt", exc)  # before the record: it is newer
                    rec = _failed_record(st, cfg, prov, started, t0, exc, info)
                _write(records_dir, _in_row(rec, sweep, tags))
    return records_dir


def _finished_meanwhile(records_dir: Path, h: str, mine: tuple[str, str] | None) -> bool:
    """Whether an ok record of run ``h`` for this row appeared since the suite started."""
    return any(r.status == "ok" and r.config_hash == h and row_key(r.sweep) == mine
               for r in load_records(records_dir))


def _data_parallel_stages(run_all: Callable[[], Any]) -> bool:
    """Under torchrun: run ``run_all`` (the pretrainings, then the data-parallel tasks) on every
    rank, then close the process group. Returns whether this process goes on to the other tasks:
    always without a process group, rank 0 only with one."""
    if distributed.get_world_size() == 1:
        return True
    run_all()
    main = distributed.is_main()
    distributed.barrier()
    distributed.cleanup()  # rank 0 runs the tasks as a plain process
    return main


def _write(records_dir: Path, rec: Record) -> None:
    """Write ``rec`` (rank 0 alone under a process group)."""
    if distributed.is_main():
        write_record(rec, records_dir)


def _silent(msg: str) -> None:
    """The task log of ranks > 0."""


def _in_row(rec: Record, sweep: SweepInfo | None, tags: dict[str, str]) -> Record:
    """The record as one of a sweep row's: tagged, its encoder named after the row."""
    if sweep is None:
        return rec
    base = rec.encoder.name.split("@")[0]  # suite encoder names cannot hold '@'
    enc = rec.encoder.model_copy(update={"name": row_encoder_name(base, sweep)})
    return rec.model_copy(update={"sweep": sweep, "tags": tags, "encoder": enc})


def _reused_record(src: Record, entry: EncoderEntry, seed: int, sweep: SweepInfo | None,
                   tags: dict[str, str], prov: dict[str, Any]) -> Record:
    """A record of this row holding the result of ``src``, a run of the identical config."""
    name = row_encoder_name(entry.name, sweep)
    now = utc_now()
    return src.model_copy(update={
        "run_id": new_run_id(f"{name}-{src.task.name}-s{seed}"),
        "started_at": now, "finished_at": now, "duration_s": 0.0,
        "encoder": src.encoder.model_copy(update={"name": name}),
        "details": {**src.details, "reused_from": src.run_id},
        "tags": tags, "sweep": sweep, "provenance": prov,
    })


def _failed_record(st: TaskStage, cfg: SuiteConfig, prov: dict[str, Any], started: str,
                   t0: float, exc: BaseException, info: EncoderInfo | None = None) -> Record:
    entry, task = st.entry, st.task
    return Record(
        run_id=new_run_id(f"{entry.name}-{st.kind}-s{st.seed}"),
        status="failed", started_at=started, finished_at=utc_now(), duration_s=time.time() - t0,
        encoder=info or EncoderInfo(name=entry.name, arch=_named_arch(entry), source=entry.source,  # type: ignore[arg-type]
                                    checkpoint=entry.checkpoint),
        recipe=entry.pretrain.recipe.model_dump(mode="json") if entry.pretrain else None,
        task=TaskInfo(name=task.name, version=task.version),
        metric_info={k: MetricInfo(higher_is_better=v)
                     for k, v in task.metric_names(st.task_cfg).items()},
        config=st.run_config, config_hash=st.key, seed=st.seed, suite=cfg.name, provenance=prov,
        error=ErrorInfo(type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc()),
    )


def _named_arch(entry: EncoderEntry) -> str:
    """The architecture a failed record names when no encoder was built: the entry's own, or
    for a checkpoint entry that names none, that nothing was loaded (not the schema default)."""
    if entry.checkpoint is not None and "encoder" not in entry.model_fields_set:
        return "unknown (checkpoint not loaded)"
    return entry.encoder.arch
