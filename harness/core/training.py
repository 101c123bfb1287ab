"""Training utilities shared by the three training loops: pretraining (:mod:`pretrain.engine`),
fine-tuning (:mod:`downstream.finetune`) and MAE's linear probe
(:mod:`downstream.linear_probe_faithful`).

* Device and precision: CUDA when visible, bf16 autocast on a GPU, fp32 on CPU.
* The lr schedule of MAE's ``util/lr_sched.py`` (He et al., CVPR 2022): per step, a linear
  warmup then a half-cosine to ``min_lr``.
* The seeded epoch order: a permutation that is a function of (seed, epoch) only, cut into the
  epoch's full batches; a run resumed at step ``s`` reads the batches of the uninterrupted run
  from ``s`` on.
* One resumable-checkpoint policy (:class:`ResumableCheckpoint`): written atomically, holding the
  hash of the config that wrote it; a checkpoint of another config is refused on resume (a
  :class:`~harness.core.errors.CheckpointError` naming the file and the fix), never silently
  replaced.
* Gradient accumulation (:class:`GradAccumulation`): ``k`` micro-batches, each loss divided by
  ``k``, one optimizer step; with micro-batches of equal size the summed gradient is the large
  batch's (as in MAE's ``accum_iter``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from harness.core.config import ConfigError
from harness.core.errors import CheckpointError
from harness.core.fsutil import atomic_torch_save

#: The key of the config hash inside a resumable checkpoint.
HASH_KEY = "config_hash"


# --------------------------------------------------------------------------- device, precision


def pick_device(pref: str) -> torch.device:
    """``auto`` takes CUDA when available."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU under ``auto``; fp32 (None) on CPU."""
    if pref == "fp32" or (pref == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """The autocast context of :func:`autocast_dtype`'s choice (disabled for fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# --------------------------------------------------------------------------- lr schedule


def lr_at(step: float, total: int, warmup: float, peak: float, min_lr: float) -> float:
    """Linear warmup for ``warmup`` steps, then half-cosine from ``peak`` to ``min_lr``."""
    if step < warmup:
        return peak * step / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
    """The linear scaling rule ``base_lr * batch / base_batch`` (Goyal et al., 2017; MAE: 256)."""
    return base_lr * batch_size / base_batch


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group ``lr``, times the group's ``lr_scale`` where it has one
    (layer-wise lr decay, BEiT / MAE)."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


# --------------------------------------------------------------------------- seeded order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 7_919 + epoch) % (2**63 - 1))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int, fix: str) -> int:
    """Full batches of ``batch_size`` in ``n`` samples (the last partial batch is dropped).

    Raises:
        ConfigError: Not one full batch; ``fix`` says which key to lower.
    """
    steps = n // batch_size
    if steps == 0:
        raise ConfigError(
            f"train split has {n} images, fewer than one batch of {batch_size}: {fix}"
        )
    return steps


def epoch_batches(
    n: int, seed: int, epoch: int, batch_size: int, start: int = 0, micro: int | None = None
) -> list[list[int]]:
    """The sample indices of ``epoch``'s batches from batch ``start`` on, in order.

    The epoch is :func:`epoch_order` cut into ``n // batch_size`` full batches; each batch is cut
    into consecutive micro-batches of ``micro`` samples (gradient accumulation, or one slice per
    data-parallel rank: rank ``r`` of ``w`` takes ``[r::w]`` with ``micro = batch_size // w``).

    Args:
        n: Samples in the split.
        seed: Run seed.
        epoch: Epoch number.
        batch_size: Samples per (optimizer) step.
        start: The first batch to return (a run resumed mid-epoch).
        micro: Micro-batch size, dividing ``batch_size`` (None: whole batches).

    Returns:
        ``(n // batch_size - start) * (batch_size // micro)`` lists of ``micro`` indices.
    """
    micro = micro or batch_size
    if batch_size % micro:
        raise ValueError(f"micro-batch {micro} must divide the batch {batch_size}")
    order = epoch_order(n, seed, epoch)[: (n // batch_size) * batch_size]
    rest = order[start * batch_size :]
    return [rest[i : i + micro] for i in range(0, len(rest), micro)]


# --------------------------------------------------------------------------- resumable checkpoints


class ResumableCheckpoint:
    """A training loop's checkpoint file: saved atomically with the config hash, refused on
    resume when another config wrote it.

    Args:
        path: The checkpoint file.
        config_hash: The hash of what the run's result depends on (config, data, seed, encoder).
        fix: What to do about a checkpoint of another config (how to start over).
    """

    def __init__(self, path: Path, config_hash: str, fix: str) -> None:
        self.path, self.config_hash, self.fix = Path(path), config_hash, fix

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any] | None:
        """The saved state (weights-only load, on CPU), or None when there is no checkpoint.

        Raises:
            CheckpointError: The checkpoint was written by a different config.
        """
        if not self.exists():
            return None
        ck = torch.load(self.path, map_location="cpu", weights_only=True)
        if ck.get(HASH_KEY) != self.config_hash:
            raise CheckpointError(
                f"{self.path} was written by a different config (hash {ck.get(HASH_KEY)} vs "
                f"{self.config_hash}); {self.fix}"
            )
        return ck

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` plus the config hash atomically (a kill leaves the old file whole)."""
        atomic_torch_save({**state, HASH_KEY: self.config_hash}, self.path)


# --------------------------------------------------------------------------- accumulation


class GradAccumulation:
    """Gradient accumulation over ``k`` micro-batches per optimizer step (MAE's ``accum_iter``).

    Micro-batch ``i`` (counted from the first of a step) :meth:`starts` a step when
    ``i % k == 0`` (set the lr there), its loss is divided by ``k`` (:meth:`scale`) before
    ``backward``, and it :meth:`ends` the step when ``(i + 1) % k == 0`` (clip, step, zero the
    gradients there). With equal micro-batches and a mean loss, the accumulated gradient is the
    gradient of the mean over the whole batch.

    Args:
        k: Micro-batches per step (1: no accumulation).
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"accumulation steps must be >= 1, got {k}")
        self.k = k

    def starts(self, i: int) -> bool:
        return i % self.k == 0

    def ends(self, i: int) -> bool:
        return (i + 1) % self.k == 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss / k`` (``loss`` itself without accumulation)."""
        return loss / self.k if self.k > 1 else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Add this micro-batch's share of the step's gradient."""
        self.scale(loss).backward()


def split_batch(size: int, k: int) -> list[slice]:
    """``min(k, size)`` consecutive non-empty slices covering ``range(size)``, their sizes
    differing by at most one (the first ones the larger): the micro-batches of one batch of
    ``size`` samples when the loop accumulates over ``k``."""
    parts = min(k, size)
    q, r = divmod(size, parts) if parts else (0, 0)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + q + (1 if j < r else 0))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def clip_and_step(
    opt: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], clip_grad: float | None
) -> None:
    """Clip the gradient norm (when ``clip_grad`` is set) and take the optimizer step."""
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    opt.step()


# --------------------------------------------------------------------------- non-finite losses


class NonfinitePolicy:
    """What a training loop does about a non-finite loss (pretraining's ``train.nonfinite``,
    fine-tuning's ``nonfinite``): ``stop`` raises naming the step; ``skip`` makes no update that
    step and counts it; ``restore`` reloads the last checkpoint and multiplies the lr by
    ``lr_factor`` from then on. More than ``max_events`` events with no finite step past the
    last one give up with the ``stop`` error. The loop decides on one verdict for every rank
    (the loss reduced over them) and calls :meth:`event`, then for a restore :meth:`restored`,
    then :meth:`record`; after each finite step :meth:`stepped`. The events and the lr scale
    travel in the checkpoint (:meth:`state`, :meth:`load_state`) and the summary (:meth:`summary`).

    Args:
        policy: ``stop``, ``skip`` or ``restore``.
        lr_factor: The lr multiplier of each restore.
        max_events: Events in a row before giving up.
        keys: The prefix of the config keys the messages name (``train.`` in pretraining).
    """

    def __init__(self, policy: str, lr_factor: float, max_events: int, keys: str = "") -> None:
        self.policy, self.lr_factor, self.max_events, self.keys = policy, lr_factor, max_events, keys
        self.events: list[dict[str, Any]] = []
        self.lr_scale = 1.0  # the product of the restore factors so far
        self.streak = 0  # events since a step last got past the last event's step
        self.last_event_step = 0

    def event(self, step: int, value: float, lr: float, checkpoint: Path | None) -> dict[str, Any]:
        """A non-finite loss ``value`` at step ``step`` (the optimizer steps done before it): the
        event to act on (its ``action``: ``skip`` or ``restore``).

        Args:
            checkpoint: The last good checkpoint, named by the error (None: none yet).

        Raises:
            FloatingPointError: ``stop``, or more than ``max_events`` events in a row.
        """
        self.streak += 1
        self.last_event_step = max(self.last_event_step, step + 1)  # the count once it succeeds
        if self.policy == "stop" or self.streak > self.max_events:
            given_up = (
                f" after {self.streak - 1} non-finite event(s) in a row "
                f"({self.keys}nonfinite_max_events={self.max_events}, policy '{self.policy}')"
                if self.policy != "stop"
                else ""
            )
            raise FloatingPointError(
                f"loss is {value} at step {step}{given_up}; the last good checkpoint is "
                f"{checkpoint or '(none yet)'}. Lower {self.keys}base_lr, set {self.keys}clip_grad, "
                f"or set {self.keys}nonfinite: skip / restore"
            )
        return {"step": step, "loss": str(value), "lr": lr, "action": self.policy}

    def restored(self, event: dict[str, Any], step: int) -> None:
        """The checkpoint of step ``step`` was reloaded for ``event``: the lr is lowered."""
        self.lr_scale *= self.lr_factor
        event |= {"restored_step": step, "lr_scale": self.lr_scale}

    def record(self, event: dict[str, Any]) -> str:
        """Keep ``event``; the log's note of how many came in a row."""
        self.events.append(event)
        return f"(event {self.streak} in a row, at most {self.max_events})"

    def handle(
        self, step: int, value: float, lr: float, checkpoint: Path | None, reload: Callable[[], int]
    ) -> tuple[int, str]:
        """Act on a non-finite loss at step ``step``: ``skip`` moves to the next step without an
        update, ``restore`` calls ``reload`` (loads the last checkpoint into the loop, returns its
        step) and lowers the lr. Returns the step to go on from and the log's words for it.

        Raises:
            FloatingPointError: ``stop``, or more than ``max_events`` events in a row.
        """
        event = self.event(step, value, lr, checkpoint)
        if event["action"] == "skip":
            return step + 1, f"step skipped (no update) {self.record(event)}"
        at = reload()
        self.restored(event, at)
        what = f"restored step {at} from {checkpoint}, lr x {self.lr_scale:.3g} from now on"
        return at, f"{what} {self.record(event)}"

    def stepped(self, step: int) -> None:
        """A finite step brought the count to ``step``."""
        if step >= self.last_event_step:  # past the last non-finite event
            self.streak = 0

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the lr scale and the events so far."""
        return {"lr_scale": self.lr_scale, "nonfinite_events": self.events}

    def load_state(self, ck: dict[str, Any]) -> None:
        """Take the lr scale and events of a checkpoint (absent keys: none yet)."""
        self.lr_scale = float(ck.get("lr_scale", 1.0))
        self.events = list(ck.get("nonfinite_events", []))

    def summary(self) -> dict[str, Any]:
        """The policy, every event, the skipped steps, the restores and the lr scale reached."""
        return {
            "policy": self.policy, "events": self.events,
            "skipped_steps": sum(e["action"] == "skip" for e in self.events),
            "restores": sum(e["action"] == "restore" for e in self.events),
            "lr_scale": self.lr_scale,
        }  # fmt: skip
