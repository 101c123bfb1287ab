"""Launchers: where a suite's stages run. The suite itself never changes.

* ``inprocess``: everything in this process, in order (:func:`harness.runner.run_suite`).
* ``torchrun``: the same command re-executed under ``python -m torch.distributed.run``, one
  process per GPU (or per CPU worker, gloo) on one or several machines; the pretrainings run
  data-parallel across all of them and rank 0 runs the downstream tasks
  (:mod:`harness.distributed`).
* ``submitit-local`` / ``slurm``: one job per stage through submitit: a job per pretraining,
  then a job per task run that depends on its encoder's pretraining (``afterok`` on SLURM;
  on the local executor the dependents are submitted once the pretrainings finished). Jobs are
  checkpointable: on preemption or timeout submitit resubmits the same job, and the stage
  resumes from its last checkpoint because every stage is resumable by construction.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import SuiteConfig, to_plain, validate_config
from harness.errors import UserError
from harness.runner import StageFilter, run_suite, suite_dir


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
    """A picklable job that runs one stage of a suite (see :class:`StageFilter`)."""

    def __init__(self, suite: dict[str, Any], only: StageFilter) -> None:
        self.suite = suite
        self.only = only

    def __call__(self) -> str:
        cfg = validate_config(self.suite, source="launcher job")
        assert isinstance(cfg, SuiteConfig)
        return str(run_suite(cfg, log=lambda m: print(m, flush=True), only=self.only))

    def checkpoint(self) -> Any:
        """Called by submitit on preemption/timeout: resubmit the same stage (it resumes)."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageJob(self.suite, self.only))


def launch_submitit(cfg: SuiteConfig, kind: str, opts: SlurmOptions, log: Any = print) -> Path:
    """Run a suite as submitit jobs (``kind``: ``submitit-local`` or ``slurm``)."""
    try:
        import submitit
    except ImportError:
        raise UserError("the submitit launchers need submitit: pip install submitit") from None
    from harness.runner import preflight

    preflight(cfg)  # bad input is rejected before any job is submitted
    root = suite_dir(cfg)
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
    raw = to_plain(cfg)

    pre_jobs: dict[tuple[str, int], Any] = {}
    for seed in cfg.seeds:
        for e in cfg.encoders:
            if e.pretrain is not None:
                job = executor.submit(StageJob(raw, StageFilter(e.name, seed, pretrain_only=True)))
                pre_jobs[(e.name, seed)] = job
                log(f"[launch] submitted pretraining of {e.name} seed {seed}: job {job.job_id}")
    if kind != "slurm":
        for job in pre_jobs.values():
            _wait(job, log)
    task_jobs = []
    for seed in cfg.seeds:
        for e in cfg.encoders:
            dep = pre_jobs.get((e.name, seed))
            for t in cfg.tasks:
                if kind == "slurm" and dep is not None:
                    executor.update_parameters(
                        slurm_additional_parameters={"dependency": f"afterok:{dep.job_id}"})
                job = executor.submit(StageJob(raw, StageFilter(e.name, seed, t.name)))
                task_jobs.append(job)
                log(f"[launch] submitted {t.name} of {e.name} seed {seed}: job {job.job_id}")
                if kind == "slurm":
                    executor.update_parameters(slurm_additional_parameters={})
    for job in task_jobs:
        _wait(job, log)
    return root / "records"


def _wait(job: Any, log: Any) -> None:
    try:
        job.result()
    except Exception as exc:  # the stage recorded its own failure; report and go on
        log(f"[launch] job {job.job_id} failed: {str(exc).splitlines()[-1] if str(exc) else exc}")
