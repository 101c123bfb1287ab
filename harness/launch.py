"""Launchers: where a suite's stages run. The suite itself never changes.

* ``inprocess``: everything in this process, in order (:func:`harness.runner.run_suite`).
* ``torchrun``: the same command re-executed under ``python -m torch.distributed.run``, one
  process per GPU (or per CPU worker, gloo) on one or several machines; the pretrainings run
  data-parallel across all of them, then the data-parallel tasks (fine-tuning), and rank 0 runs
  the other downstream tasks (:mod:`harness.core.distributed`).
* ``submitit-local`` / ``slurm``: one job per stage through submitit: a job per pretraining,
  then a job per task run that depends on its encoder's pretraining (``afterok`` on SLURM;
  on the local executor the dependents are submitted once the pretrainings finished). Jobs are
  checkpointable: on preemption or timeout submitit resubmits the same job, and the stage
  resumes from its last checkpoint because every stage is resumable by construction.
  A sweep submits every row's stages the same way; rows with identical stages share one job
  (:func:`launch_submitit_sweep`). On SLURM with ``gpus_per_node > 1`` a pretraining job runs
  one process per GPU (``tasks_per_node``); each joins the job's process group
  (submitit's ``TorchDistributedEnvironment``), so the pretraining is data-parallel as under
  torchrun: DDP, or FSDP with ``train.fsdp``. So does a job of a data-parallel task
  (:attr:`downstream.base.Task.data_parallel`: fine-tuning, DDP or FSDP with its ``fsdp``); the
  other task jobs stay one process.

  A task job never pretrains: if its encoder's pretraining did not finish (its job failed, which
  holds the task on SLURM through ``afterok``; the local executor has no dependencies), the job
  records the task as failed ("blocked: pretraining ... failed") without running it, and
  ``mimbench plan`` shows it as ``blocked``. The launching process holds the suite's lock
  (:func:`harness.runner.suite_lock_path`) until every job finished; each job holds its stage's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import downstream  # noqa: F401  (registers every task and its config schema)
from harness.core import distributed
from harness.core.config import SuiteConfig, to_plain, validate_config
from harness.core.errors import UserError
from harness.core.fsutil import stage_lock
from harness.core.records import SweepInfo, load_records
from harness.runner import run_suite, suite_lock_path
from harness.stages import (
    StageFilter,
    SuitePlan,
    TaskStage,
    check_plans,
    plan_stages,
    plan_sweep_stages,
)
from harness.sweep import SweepRow


@dataclass
class SlurmOptions:
    """Resources per job (SLURM); ignored by the local executor except the timeout."""

    partition: str | None = None
    timeout_min: int = 24 * 60
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 16


@dataclass
class TorchrunOptions:
    """Where the torchrun launcher's processes run (torchrun's own flags of the same names).

    Attributes:
        nproc_per_node: Processes on this machine (one per GPU; any number on CPU).
        nnodes: Machines in the run; each runs the same command with its own ``node_rank``.
        node_rank: This machine's index in ``[0, nnodes)``.
        master_addr: Address of the node with rank 0 (required with ``nnodes > 1``).
        master_port: A free TCP port on that node.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    def validate(self) -> None:
        """Reject impossible placements before anything starts.

        Raises:
            UserError: Naming the flag to fix.
        """
        if self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise UserError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank} is outside [0, --nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.master_addr:
            raise UserError(
                f"--nnodes {self.nnodes} needs --master-addr: the address of the node with "
                "--node-rank 0, which every node can reach"
            )


def torchrun_command(cli_args: list[str], opts: TorchrunOptions) -> list[str]:
    """The command that runs ``mimbench <cli_args>`` under ``torch.distributed.run``.

    One machine without ``--master-addr`` uses torchrun's ``--standalone`` rendezvous (a free
    local port); otherwise the static rendezvous on ``master_addr:master_port``.
    """
    opts.validate()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={opts.nproc_per_node}"]
    if opts.nnodes == 1 and not opts.master_addr:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={opts.nnodes}", f"--node-rank={opts.node_rank}",
                f"--master-addr={opts.master_addr}", f"--master-port={opts.master_port}"]
    return [*cmd, "-m", "harness.cli", *cli_args]


def launch_torchrun(cli_args: list[str], opts: TorchrunOptions, log: Any = print) -> int:
    """Re-execute ``mimbench <cli_args>`` under torchrun and wait; returns its exit status.

    Args:
        cli_args: The mimbench arguments each process runs (with ``--launcher inprocess``).
        opts: Process placement.
        log: Where the launch line goes.
    """
    cmd = torchrun_command(cli_args, opts)
    log(f"[launch] torchrun: {opts.nnodes} node(s) x {opts.nproc_per_node} process(es): "
        + " ".join(cmd))
    env = dict(os.environ)
    # each worker imports the project from the checkout it was launched from
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(cmd, env=env).returncode


class StageJob:
    """A picklable job that runs one stage of a suite (see :class:`StageFilter`).

    The suite and the sweep row it belongs to (if any) travel as plain mappings, so the
    pickle stays small; the job validates them again before running.
    """

    def __init__(self, suite: dict[str, Any], only: StageFilter,
                 sweep: dict[str, Any] | None = None, multiprocess: bool = False) -> None:
        self.suite = suite
        self.only = only
        self.sweep = sweep
        self.multiprocess = multiprocess  # one of several processes of a SLURM job

    def __call__(self) -> str:
        cfg = validate_config(self.suite, source="launcher job")
        assert isinstance(cfg, SuiteConfig)
        info = SweepInfo.model_validate(self.sweep) if self.sweep is not None else None
        if self.multiprocess:
            _join_job_group()
        return str(run_suite(cfg, log=lambda m: print(m, flush=True), only=self.only, sweep=info))

    def checkpoint(self) -> Any:
        """Called by submitit on preemption/timeout: resubmit the same stage (it resumes)."""
        import submitit

        again = StageJob(self.suite, self.only, self.sweep, self.multiprocess)
        return submitit.helpers.DelayedSubmission(again)


def _join_job_group() -> None:
    """Join the process group of this SLURM job's processes: submitit exports ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun would (every
    process keeps every GPU visible; :func:`harness.core.distributed.init_from_env` picks
    ``cuda:LOCAL_RANK``). :func:`harness.runner.run_suite` leaves the group when done."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    distributed.init_from_env()


def pretrain_tasks_per_node(kind: str, opts: SlurmOptions) -> int:
    """Processes of a pretraining job on each node: one per GPU on SLURM, else one."""
    return max(1, opts.gpus_per_node) if kind == "slurm" else 1


def launch_submitit(cfg: SuiteConfig, kind: str, opts: SlurmOptions, log: Any = print) -> Path:
    """Run a suite as submitit jobs (``kind``: ``submitit-local`` or ``slurm``); returns the
    records directory once every job finished."""
    plan = plan_stages(cfg)
    check_plans([plan])  # bad input is rejected before any job is submitted
    with stage_lock(suite_lock_path(plan.root, to_plain(cfg)), f"suite {cfg.name} in {plan.root}"):
        return _launch([cfg], [None], kind, opts, log)


def launch_submitit_sweep(rows: list[SweepRow], kind: str, opts: SlurmOptions,
                          log: Any = print) -> Path:
    """Run every row of a sweep as submitit jobs into one suite directory.

    Stages are keyed by their resolved config, as in :func:`harness.runner.run_sweep`: rows
    whose pretraining configs are identical share one pretraining job (one stage directory,
    never trained twice at once), and a task run whose config another row already submitted
    is not submitted again: once the jobs finished, the row gets its own record (its sweep
    tags, ``details.reused_from``) holding that run's metrics. Returns the records directory.
    """
    plans = plan_sweep_stages(rows)
    check_plans(plans)  # every row is checked before any job is submitted
    root = plans[0].root
    plain = [to_plain(r.config) for r in rows]
    with stage_lock(suite_lock_path(root, plain), f"sweep {rows[0].info.name} in {root}"):
        return _launch([r.config for r in rows], [r.info for r in rows], kind, opts, log)


def _executor(kind: str, root: Path, opts: SlurmOptions) -> Any:
    try:
        import submitit
    except ImportError:
        raise UserError("the submitit launchers need submitit: pip install submitit") from None
    folder = root / "jobs" / "%j"
    if kind == "slurm":
        executor: Any = submitit.AutoExecutor(folder=folder, cluster="slurm")
    elif kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
    else:
        raise UserError(f"unknown launcher '{kind}': use inprocess, torchrun, submitit-local or slurm")
    params: dict[str, Any] = {"timeout_min": opts.timeout_min}
    if kind == "slurm":
        params.update(slurm_partition=opts.partition, gpus_per_node=opts.gpus_per_node,
                      cpus_per_task=opts.cpus_per_task, mem_gb=opts.mem_gb)
    executor.update_parameters(**params)
    return executor


def _submit(executor: Any, kind: str, job: StageJob, after: Any = None, tasks: int = 1) -> Any:
    """Submit ``job`` (``tasks`` processes per node on SLURM); on SLURM it starts once ``after``
    (a job, or None) finished well."""
    if kind != "slurm":
        return executor.submit(job)
    extra = {"dependency": f"afterok:{after.job_id}"} if after is not None else {}
    executor.update_parameters(slurm_additional_parameters=extra, tasks_per_node=tasks)
    try:
        return executor.submit(job)
    finally:
        executor.update_parameters(slurm_additional_parameters={}, tasks_per_node=1)


def _launch(suites: list[SuiteConfig], infos: list[SweepInfo | None], kind: str,
            opts: SlurmOptions, log: Any) -> Path:
    """Submit the stages of one suite, or of every row of a sweep (suites sharing one suite
    directory, each with its row info), wait for them, and return the records directory."""
    plans, jobs = [], []
    for cfg, info in zip(suites, infos, strict=True):
        raw = to_plain(cfg)
        again = validate_config(raw, source="launcher")  # what the jobs will see
        assert isinstance(again, SuiteConfig)
        plans.append(plan_stages(again, info))  # the stages (and keys) the jobs will run
        jobs.append(partial(StageJob, raw, sweep=info.model_dump(mode="json") if info else None))
    root = plans[0].root
    executor = _executor(kind, root, opts)
    pre_tasks = pretrain_tasks_per_node(kind, opts)

    # pretrainings, one job per stage directory (rows with the same config share it)
    pre_jobs: dict[Path, tuple[Any, str]] = {}
    for plan, make in zip(plans, jobs, strict=True):
        for pre in (g.pretrain for g in plan.groups if g.pretrain is not None):
            where = f"{plan.encoder_name(pre.entry)} seed {pre.seed}"
            if pre.dir in pre_jobs:
                log(f"[launch] pretraining of {where}: same stage as {pre_jobs[pre.dir][1]}, "
                    f"shares its job {pre_jobs[pre.dir][0].job_id}")
                continue
            only = StageFilter(pre.entry.name, pre.seed, pretrain_only=True)
            job = _submit(executor, kind, make(only, multiprocess=pre_tasks > 1), tasks=pre_tasks)
            pre_jobs[pre.dir] = (job, where)
            log(f"[launch] submitted pretraining of {where}: job {job.job_id}")
    if kind != "slurm":  # the local executor knows no dependencies
        for job, _ in pre_jobs.values():
            _wait(job, log)

    # task runs, one job per run config; a row repeating another's run reuses its result
    task_jobs: dict[str, tuple[Any, str]] = {}
    shared: list[tuple[SuitePlan, TaskStage, str, str]] = []
    for plan, make in zip(plans, jobs, strict=True):
        for run in (t for g in plan.groups for t in g.tasks):
            where = f"{run.kind} of {plan.encoder_name(run.entry)} seed {run.seed}"
            if run.key in task_jobs:
                src_job, src = task_jobs[run.key]
                log(f"[launch] {where}: same config as {src} (job {src_job.job_id}), "
                    "its result is reused")
                shared.append((plan, run, where, src))
                continue
            dep = pre_jobs.get(run.after.dir) if run.after is not None else None
            for inp in (i for i in run.inputs if i.key in task_jobs):  # reads an earlier task's
                dep = task_jobs[inp.key]  # output (robustness: a classifier); that job already
                if kind != "slurm":  # waits for the pretraining
                    _wait(dep[0], log)
            # the job never pretrains: a failed dependency blocks it (a failed record)
            tasks = pre_tasks if run.task.data_parallel else 1  # fine-tuning: one per GPU
            job = _submit(executor, kind, make(_task_filter(run, no_pretrain=True),
                                               multiprocess=tasks > 1),
                          dep[0] if dep else None, tasks=tasks)  # fmt: skip
            task_jobs[run.key] = (job, where)
            log(f"[launch] submitted {where}: job {job.job_id}")
    for job, _ in task_jobs.values():
        _wait(job, log)

    records_dir = root / "records"
    if shared:  # each sharing row gets its own record of the run (written here, no job)
        ok = {r.config_hash for r in load_records(records_dir) if r.status == "ok"}
        for plan, run, where, src in shared:
            if run.key not in ok:
                log(f"[launch] {where}: the run it shares ({src}) failed; run again to retry")
                continue
            run_suite(plan.suite, log=log, only=_task_filter(run), sweep=plan.sweep)
    return records_dir


def _task_filter(run: TaskStage, no_pretrain: bool = False) -> StageFilter:
    """The part of its suite that is the task run ``run``."""
    return StageFilter(run.entry.name, run.seed, run.kind, no_pretrain=no_pretrain, key=run.key)


def _wait(job: Any, log: Any) -> None:
    try:
        job.result()
    except Exception as exc:  # the stage recorded its own failure; report and go on
        log(f"[launch] job {job.job_id} failed: {str(exc).splitlines()[-1] if str(exc) else exc}")
