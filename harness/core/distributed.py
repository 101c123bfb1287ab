"""Process-group helpers for data-parallel runs launched by ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and tells each
its place through environment variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env` reads them and joins the process group;
every other helper here is a no-op (or the identity) when the process was not launched that way,
so library code calls them unconditionally and a plain ``python`` run stays a single process.

Backends: CPU tensors go through gloo; on a machine with CUDA the group is created as
``cpu:gloo,cuda:nccl``, so CUDA tensors travel over NCCL and CPU tensors (scalars, objects) over
gloo in the same group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from harness.core.errors import UserError

#: Environment variables torchrun sets for each worker; the first two are required.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """What torchrun told this process (``world_size == 1`` when it was not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env() -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (defaults: one process).

    Raises:
        UserError: A variable is set but not an integer, or only one of RANK and WORLD_SIZE is
            set (a half-configured launch would otherwise hang waiting for peers).
    """
    raw = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if (raw["RANK"] is None) != (raw["WORLD_SIZE"] is None):
        raise UserError(
            "RANK and WORLD_SIZE must be set together (torchrun sets both); unset the one that "
            "is set to run as a single process"
        )
    try:
        vals = {k: int(v) if v is not None else None for k, v in raw.items()}
    except ValueError:
        raise UserError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {raw}") from None
    world = vals["WORLD_SIZE"] or 1
    rank = vals["RANK"] or 0
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    local = vals["LOCAL_RANK"] if vals["LOCAL_RANK"] is not None else rank
    return DistEnv(rank=rank, world_size=world, local_rank=local)


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` when CUDA (and NCCL) is there, else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(backend: str | None = None, timeout_min: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes; a no-op for a single process.

    Idempotent: a second call (or a call after the caller initialized the group itself) returns
    the current placement. On CUDA machines the current device becomes ``cuda:LOCAL_RANK``.

    Args:
        backend: torch.distributed backend string (default: :func:`default_backend`).
        timeout_min: How long a collective may wait for the slowest rank before failing.

    Returns:
        This process's rank, the world size and its local rank.
    """
    if is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), env().local_rank)
    e = env()
    if e.world_size == 1:
        return e
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(
            f"WORLD_SIZE={e.world_size} but {', '.join(missing)} is not set: launch through "
            "`torchrun` (or `mimbench run --launcher torchrun`), which sets it"
        )
    if torch.cuda.is_available():
        if e.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={e.local_rank} but this machine shows {torch.cuda.device_count()} "
                "CUDA devices: lower --nproc-per-node to the number of GPUs"
            )
        torch.cuda.set_device(e.local_rank)
    dist.init_process_group(
        backend=backend or default_backend(),
        init_method="env://",
        rank=e.rank,
        world_size=e.world_size,
        timeout=timedelta(minutes=timeout_min),
    )
    return e


def init_single_process(backend: str | None = None) -> None:
    """A process group of this process alone (world size 1, an in-memory store), so that code
    needing one runs on one device, e.g. FSDP's ``fully_shard`` in ``mimbench bench
    pretrain/<recipe>+fsdp``; nothing when a group exists. Leave it with :func:`cleanup`."""
    if is_initialized():
        return
    dist.init_process_group(backend=backend or default_backend(), store=dist.HashStore(), rank=0,
                            world_size=1)  # fmt: skip


def is_initialized() -> bool:
    """Whether a process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0: the process that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over ranks (the value itself for a single process).

    The reduction runs on the tensor's device (gloo for CPU, NCCL for CUDA tensors).
    """
    if get_world_size() == 1:
        return float(value)
    t = (
        value.detach().float().reshape(1).clone()
        if isinstance(value, torch.Tensor)
        else (torch.tensor([float(value)], dtype=torch.float32))
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself for a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave and destroy the process group (no-op when there is none)."""
    if is_initialized():
        dist.destroy_process_group()
