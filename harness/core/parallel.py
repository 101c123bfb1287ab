"""Memory and compute wrappers of a training loop's model: activation checkpointing, FSDP
(PyTorch's ``fully_shard``), ``torch.compile`` with an eager fallback, and full state dicts that
read the same whatever the wrapping.

* Activation checkpointing (:func:`checkpoint_blocks`): each block's activations are recomputed
  in the backward pass (``torch.distributed._composable.checkpoint``, non-reentrant, RNG state
  preserved, so drop path draws the same masks twice); parameter names do not change, so
  checkpoints and exports read as without it.
* FSDP (:func:`shard_blocks`): one ``fully_shard`` unit per block and one for the rest of the model
  (the root), over a 1-d device mesh of every rank; gloo on CPU, NCCL on CUDA. ``fully_shard``
  replaces the module's parameters by sharded DTensors, so the optimizer is built after it.
* Full state dicts (:func:`model_state`, :func:`optimizer_state`, :func:`load_model_state`,
  :func:`load_optimizer_state`): a sharded model's state is gathered on rank 0 into the full
  tensors an unsharded model has (``torch.distributed.checkpoint.state_dict``), so a checkpoint
  written under FSDP holds the same weights as one written without it and every reader
  (resume, export, the checkpoint formats) works unchanged. Each gather is a collective: every
  rank calls it.
* Compile (:func:`compile_module`): ``torch.compile`` (inductor by default; compilation happens at
  the first call, so a failure surfaces there: :func:`compile_failure_message`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed import get_world_size
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

#: The ``torch.compile`` backend of :func:`compile_module` (tests swap in a cheaper one).
COMPILE_BACKEND: Any = "inductor"


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Recompute each of ``blocks`` in the backward pass instead of storing its activations.

    Returns:
        How many blocks were wrapped.
    """
    n = 0
    for blk in blocks:
        checkpoint(blk)  # hooks: the module and its parameter names stay as they are
        n += 1
    return n


def shard_blocks(model: nn.Module, blocks: Iterable[nn.Module], device: torch.device) -> int:
    """Shard ``model`` over every rank of the process group: one FSDP unit per block of
    ``blocks`` (its parameters are gathered just before it runs and freed after), then the root.

    Args:
        model: The whole model (modified in place: its parameters become sharded DTensors).
        blocks: Its transformer blocks (submodules of ``model``).
        device: The device of this rank (its type names the mesh's device type).

    Returns:
        How many blocks became their own unit.
    """
    mesh = init_device_mesh(device.type, (get_world_size(),))
    n = 0
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
        n += 1
    # registered before fully_shard's own post-forward hook, so it runs first
    model.register_forward_hook(_outputs_not_views)
    fully_shard(model, mesh=mesh)
    return n


def _outputs_not_views(module: nn.Module, args: Any, output: Any) -> Any:
    """The root's output with each tensor that requires grad and is a view of another (MAE's
    prediction is its decoder's output without the class token: a slice) replaced by a copy.
    FSDP hooks the root's outputs for its pre-backward step, and an in-place op on a view would
    drop that hook without a word (it warns at every step when it sees one); the copies cost one
    prediction-sized tensor per step, only under FSDP."""

    def own(t: Any) -> Any:
        return t.clone() if isinstance(t, torch.Tensor) and t.requires_grad and t._base is not None else t

    if isinstance(output, torch.Tensor):
        return own(output)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        fields = {f.name: own(getattr(output, f.name)) for f in dataclasses.fields(output)}
        return dataclasses.replace(output, **fields)
    return output


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Under FSDP, whether this backward reduce-scatters the gradients (off for the first
    micro-batches of an accumulated step: their gradients stay unsharded and add up locally)."""
    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(sync)


@contextlib.contextmanager
def gradient_sync_unless(net: nn.Module, last: bool) -> Iterator[None]:
    """The context of one micro-batch's backward in an accumulated step: gradients are reduced
    over the ranks on the ``last`` micro-batch only (DDP's ``no_sync``, FSDP's gradient sync off
    before it), so the step's reduction sums what every micro-batch added. A no-op for the last
    micro-batch and for a model that is neither DDP nor sharded (one process)."""
    if last:
        yield
    elif isinstance(net, DistributedDataParallel):
        with net.no_sync():
            yield
    elif is_sharded(net):
        set_gradient_sync(net, False)
        try:
            yield
        finally:
            set_gradient_sync(net, True)
    else:
        yield


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The model's full state dict (a collective under FSDP: every rank calls it; rank 0 gets
    the full tensors on CPU, the other ranks an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_full_options())


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict: as ``opt.state_dict()`` without FSDP; under FSDP the full
    state keyed by parameter name (a collective; rank 0 gets it, the others an empty dict)."""
    if not is_sharded(model):
        return opt.state_dict()
    return get_optimizer_state_dict(model, opt, options=_full_options())


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full state dict (every rank passes the whole of it; under FSDP each keeps its
    shard)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`optimizer_state` returned (every rank passes the whole of it)."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    # strict=False: a parameter that never had a gradient (MAE's encoder mask token) has no
    # AdamW state to load
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, opt, state, options=options)


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with :data:`COMPILE_BACKEND`; nothing is compiled until the
    first call, which is where a failure shows."""
    return torch.compile(module, backend=COMPILE_BACKEND)  # type: ignore[return-value]


def compile_failure_message(exc: BaseException) -> str:
    """The one warning of a failed compilation: the error (the first line of its root cause,
    which dynamo wraps in ``BackendCompilerFailed``) and what happens."""
    root = exc
    while (inner := root.__cause__ or root.__context__) is not None:
        root = inner
    first = (str(root).strip().splitlines() or [""])[0][:500]
    kind = type(exc).__name__ if root is exc else f"{type(exc).__name__} <- {type(root).__name__}"
    return (
        f"torch.compile failed ({kind}: {first}); continuing eagerly (uncompiled). "
        "Set train.compile: false to skip the attempt, or install a C++ compiler (inductor "
        "needs one) / upgrade torch"
    )
