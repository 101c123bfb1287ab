"""Launchers: where a suite's stages run. The suite itself never changes.

* ``inprocess``: everything in this process, in order (:func:`harness.runner.run_suite`).
* ``torchrun``: the same command re-executed under ``python -m torch.distributed.run``, one
  process per GPU (or per CPU worker, gloo) on one or several machines; the pretrainings run
  data-parallel across all of them and rank 0 runs the downstream tasks
  (:mod:`harness.core.distributed`).
* ``submitit-local`` / ``slurm``: one job per stage through submitit: a job per pretraining,
  then a job per task run that depends on its encoder's pretraining (``afterok`` on SLURM;
  on the local executor the dependents are submitted once the pretrainings finished). Jobs are
  checkpointable: on preemption or timeout submitit resubmits the same job, and the stage
  resumes from its last checkpoint because every stage is resumable by construction.
  A sweep submits every row's stages the same way; rows with identical stages share one job
  (:func:`launch_submitit_sweep`).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import downstream  # noqa: F401  (registers every task and its config schema)
from harness.core.config import SuiteConfig, to_plain, validate_config
from harness.core.errors import UserError
from harness.core.fsutil import stage_lock
from harness.core.records import SweepInfo, load_records
from harness.runner import StageFilter, run_suite, suite_dir, suite_lock_path
from harness.sweep import SweepRow, row_encoder_name


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
                 sweep: dict[str, Any] | None = None) -> None:
        self.suite = suite
        self.only = only
        self.sweep = sweep

    def __call__(self) -> str:
        cfg = validate_config(self.suite, source="launcher job")
        assert isinstance(cfg, SuiteConfig)
        info = SweepInfo.model_validate(self.sweep) if self.sweep is not None else None
        return str(run_suite(cfg, log=lambda m: print(m, flush=True), only=self.only, sweep=info))

    def checkpoint(self) -> Any:
        """Called by submitit on preemption/timeout: resubmit the same stage (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.suite, self.only, self.sweep))


def launch_submitit(cfg: SuiteConfig, kind: str, opts: SlurmOptions, log: Any = print) -> Path:
    """Run a suite as submitit jobs (``kind``: ``submitit-local`` or ``slurm``); returns the
    records directory once every job finished."""
    from harness.runner import preflight

    preflight(cfg)  # bad input is rejected before any job is submitted
    root = suite_dir(cfg)
    with stage_lock(suite_lock_path(root, to_plain(cfg)), f"suite {cfg.name} in {root}"):
        return _launch([(cfg, None)], kind, opts, log)


def launch_submitit_sweep(rows: list[SweepRow], kind: str, opts: SlurmOptions,
                          log: Any = print) -> Path:
    """Run every row of a sweep as submitit jobs into one suite directory.

    Stages are keyed by their resolved config, as in :func:`harness.runner.run_sweep`: rows
    whose pretraining configs are identical share one pretraining job (one stage directory,
    never trained twice at once), and a task run whose config another row already submitted
    is not submitted again: once the jobs finished, the row gets its own record (its sweep
    tags, ``details.reused_from``) holding that run's metrics. Returns the records directory.
    """
    from harness.runner import preflight_sweep

    preflight_sweep(rows)  # every row is checked before any job is submitted
    root = suite_dir(rows[0].config)
    plain = [to_plain(r.config) for r in rows]
    with stage_lock(suite_lock_path(root, plain), f"sweep {rows[0].info.name} in {root}"):
        return _launch([(r.config, r.info) for r in rows], kind, opts, log)


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


def _submit(executor: Any, kind: str, job: StageJob, after: Any = None) -> Any:
    """Submit ``job``; on SLURM it starts once ``after`` (a job, or None) finished well."""
    if kind != "slurm" or after is None:
        return executor.submit(job)
    executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{after.job_id}"})
    try:
        return executor.submit(job)
    finally:
        executor.update_parameters(slurm_additional_parameters={})


def _launch(items: list[tuple[SuiteConfig, SweepInfo | None]], kind: str, opts: SlurmOptions,
            log: Any) -> Path:
    """Submit the stages of one suite, or of every row of a sweep (``(suite, row info)``
    pairs sharing one suite directory), wait for them, and return the records directory."""
    from downstream.base import get_task
    from harness.core.fsutil import config_hash
    from harness.runner import pretrain_config_for, pretrain_stage_dir, run_config_for

    root = suite_dir(items[0][0])
    executor = _executor(kind, root, opts)
    rows = []
    for cfg, info in items:
        raw = to_plain(cfg)
        again = validate_config(raw, source="launcher")  # what the jobs will see
        assert isinstance(again, SuiteConfig)
        rows.append((raw, again, info, info.model_dump(mode="json") if info else None))

    # pretrainings, one job per stage directory (rows with the same config share it)
    pre_jobs: dict[Path, tuple[Any, str]] = {}
    pre_of: dict[tuple[int, str, int], Path] = {}
    for i, (raw, cfg, info, plain_info) in enumerate(rows):
        for seed in cfg.seeds:
            for e in cfg.encoders:
                if e.pretrain is None:
                    continue
                stage = pretrain_stage_dir(root, pretrain_config_for(e, cfg, seed))
                pre_of[(i, e.name, seed)] = stage
                where = f"{row_encoder_name(e.name, info)} seed {seed}"
                if stage in pre_jobs:
                    log(f"[launch] pretraining of {where}: same stage as {pre_jobs[stage][1]}, "
                        f"shares its job {pre_jobs[stage][0].job_id}")
                    continue
                job = _submit(executor, kind, StageJob(
                    raw, StageFilter(e.name, seed, pretrain_only=True), plain_info))
                pre_jobs[stage] = (job, where)
                log(f"[launch] submitted pretraining of {where}: job {job.job_id}")
    if kind != "slurm":  # the local executor knows no dependencies
        for job, _ in pre_jobs.values():
            _wait(job, log)

    # task runs, one job per run config; a row repeating another's run reuses its result
    task_jobs: dict[str, tuple[Any, str]] = {}
    shared: list[tuple[int, StageFilter, str, str, str]] = []
    for i, (raw, cfg, info, plain_info) in enumerate(rows):
        for seed in cfg.seeds:
            for e in cfg.encoders:
                for t in cfg.tasks:
                    rc = run_config_for(e, t, cfg, seed)
                    rc["task_version"] = get_task(t.name).version
                    h = config_hash(rc)  # as run_suite keys the run
                    where = f"{t.name} of {row_encoder_name(e.name, info)} seed {seed}"
                    only = StageFilter(e.name, seed, t.name)
                    if h in task_jobs:
                        src_job, src = task_jobs[h]
                        log(f"[launch] {where}: same config as {src} (job {src_job.job_id}), "
                            "its result is reused")
                        shared.append((i, only, h, where, src))
                        continue
                    dep = pre_jobs.get(pre_of.get((i, e.name, seed), root / "-"))
                    # the job never pretrains: a failed dependency blocks it (a failed record)
                    job = _submit(executor, kind, StageJob(raw, replace(only, no_pretrain=True),
                                                           plain_info), dep[0] if dep else None)
                    task_jobs[h] = (job, where)
                    log(f"[launch] submitted {where}: job {job.job_id}")
    for job, _ in task_jobs.values():
        _wait(job, log)

    records_dir = root / "records"
    if shared:  # each sharing row gets its own record of the run (written here, no job)
        ok = {r.config_hash for r in load_records(records_dir) if r.status == "ok"}
        for i, only, h, where, src in shared:
            if h not in ok:
                log(f"[launch] {where}: the run it shares ({src}) failed; run again to retry")
                continue
            run_suite(rows[i][1], log=log, only=only, sweep=rows[i][2])
    return records_dir


def _wait(job: Any, log: Any) -> None:
    try:
        job.result()
    except Exception as exc:  # the stage recorded its own failure; report and go on
        log(f"[launch] job {job.job_id} failed: {str(exc).splitlines()[-1] if str(exc) else exc}")
