"""What the pretraining engine's steps read: one DataLoader for the whole run (persistent
workers, batches prefetched across steps), fed either in the seeded global order
(:class:`IndexFeed`, random access: every layout) or as a shard stream (:class:`StreamFeed`,
``data.stream``).

Both yield, per step, this rank's batch as ``(images [b, 3, H, W], kept [n], indices)``: the
readable images, which of the ``n`` samples were readable, and the samples' indices in the
random-access dataset of the same split (what :class:`~harness.core.data.datasets.SkipTally`
names unreadable files by). An epoch's batches are a function of (seed, epoch, batch): a run
resumed at batch ``start`` of an epoch reads the uninterrupted run's batches from there on.

With loader workers the loader keeps them for the run (``persistent_workers``) and asks each
for ``prefetch`` batches ahead (:func:`~harness.core.data.fastdecode.loader_options`). A
persistent worker holds a copy of the dataset made when it started, so nothing about the epoch
may live in the dataset's attributes: the index feed sends ``(epoch, index)`` keys to its
:class:`~harness.core.data.datasets.SeededDataset`, the stream keeps its position in shared
memory (:meth:`~harness.core.data.shards.ShardStream.set_position`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from harness.core.config import ConfigError
from harness.core.data.datasets import (
    CheckedImageFolder,
    Crops,
    SeededDataset,
    collate_skipping,
)
from harness.core.data.fastdecode import loader_options
from harness.core.data.shards import ShardStream, collate_stream
from harness.core.errors import CheckpointError
from harness.core.training import epoch_batches, steps_per_epoch

#: One step's batch of one rank: images [b, 3, H, W] (views [b, V, 3, H, W]; with local crops
#: :class:`~harness.core.data.datasets.Crops`), kept [n], the n samples' indices.
Batch = tuple[torch.Tensor | Crops, torch.Tensor, list[int]]



def _loader_generator() -> torch.Generator:
    """The loader's own generator: every epoch's iterator draws its workers' base seed from it,
    not from torch's global generator, so a resumed run (which builds an iterator after
    restoring the checkpoint's global RNG state) leaves the global stream as the uninterrupted
    run has it, for the model's own randomness (data2vec 2.0's decoder noise). Samples'
    augmentations are seeded per sample, not by it."""
    return torch.Generator().manual_seed(0)

class _EpochBatches(Sampler[list[tuple[int, int]]]):
    """The index feed's batch sampler: this rank's batches of one epoch from a start batch,
    each sample keyed ``(epoch, index)``; :meth:`set_position` chooses the epoch (the loader
    draws a new iterator from it at every epoch)."""

    def __init__(self, n: int, seed: int, batch_size: int, local_batch: int, rank: int,
                 world: int) -> None:  # fmt: skip
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.local_batch, self.rank, self.world = local_batch, rank, world
        self.epoch, self.batches = 0, []

    def set_position(self, epoch: int, start: int) -> list[list[int]]:
        """This rank's slice of each global batch of ``epoch`` from batch ``start`` on."""
        self.epoch = epoch
        self.batches = epoch_batches(
            self.n, self.seed, epoch, self.batch_size, start, micro=self.local_batch
        )[self.rank :: self.world]
        return self.batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class IndexFeed:
    """The seeded global order over a random-access dataset (an ImageFolder or a shard
    dataset's :class:`~harness.core.data.shards.ShardImageFolder`): each epoch a seeded
    permutation cut into global batches, this rank's slice of each
    (:func:`~harness.core.training.epoch_batches`); a sample's augmentation is seeded by
    (seed, epoch, index), so the batches do not depend on the number of workers.

    Args:
        ds: The seeded training split.
        batch_size: The global batch.
        local_batch: This rank's share of it.
        rank: This process's rank.
        world: Number of ranks.
        num_workers: Loader workers.
        device: Where the batches go (pinned memory on a GPU).
    """

    def __init__(self, ds: SeededDataset, batch_size: int, local_batch: int, rank: int,
                 world: int, num_workers: int, device: torch.device) -> None:  # fmt: skip
        self.ds = ds
        self.steps_per_epoch = steps_per_epoch(len(ds), batch_size, "lower train.batch_size")
        self.sampler = _EpochBatches(len(ds), ds.seed, batch_size, local_batch, rank, world)
        self.loader = DataLoader(ds, batch_sampler=self.sampler, collate_fn=collate_skipping,
                                 generator=_loader_generator(),
                                 **loader_options(num_workers, device))  # fmt: skip

    def epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from batch ``start`` on."""
        batches = self.sampler.set_position(epoch, start)
        for j, (imgs, _, kept) in enumerate(self.loader):
            yield imgs, kept, batches[j]

    def state_dict(self, step: int) -> dict[str, Any]:
        """Nothing: the order is a function of the config and the step."""
        return {}

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        """Nothing to check (any number of ranks and workers continues the order exactly)."""


class StreamFeed:
    """The shard stream (``data.stream``): shards in a seeded order split over ranks and
    workers, through a shuffle buffer (:class:`~harness.core.data.shards.ShardStream`). The
    checkpoint keeps the stream's position and its numbers of ranks and workers; a resume with
    other numbers raises :class:`~harness.core.data.shards.ShardResumeError`.

    Args:
        stream: The stream of this rank's training split (``batch_size``: this rank's batch).
        base: The same split by random access (names the samples the stream yields by index).
        num_workers: Loader workers (the number the stream was built for; 0 and 1 read the
            same single stream).
        device: Where the batches go (pinned memory on a GPU).
    """

    def __init__(self, stream: ShardStream, base: CheckedImageFolder, num_workers: int,
                 device: torch.device) -> None:  # fmt: skip
        self.stream = stream
        self.steps_per_epoch = stream.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"with data.stream each of the {stream.world * stream.workers} rank x loader "
                f"worker slot(s) reads {stream.slot_samples()} sample(s) or fewer an epoch, less "
                f"than one batch of {stream.batch_size}: lower train.batch_size or "
                "data.num_workers, or write smaller shards (`mimbench data shard --shard-size`)"
            )
        # a sample's name SHARD.tar/KEY.EXT is its path in the split's folder
        self.index = {os.path.relpath(p, base.root): i for i, (p, _) in enumerate(base.samples)}
        self.loader = DataLoader(stream, batch_size=stream.batch_size, collate_fn=collate_stream,
                                 generator=_loader_generator(),
                                 **loader_options(num_workers, device))  # fmt: skip

    def epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from batch ``start`` on."""
        self.stream.set_position(epoch, start)
        for imgs, _, kept, names, _ in self.loader:
            yield imgs, kept, [self.index[n] for n in names]

    def state_dict(self, step: int) -> dict[str, Any]:
        """The stream's position after ``step`` steps, and what it depends on."""
        epoch, taken = divmod(step, self.steps_per_epoch)
        return {"stream": self.stream.state_dict(epoch, taken)}

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        """Continue the stream of checkpoint ``ck``.

        Raises:
            ShardResumeError: It was written with other numbers of ranks or loader workers.
            CheckpointError: It holds no stream position.
        """
        if "stream" not in ck:
            raise CheckpointError("the checkpoint holds no stream position: start over (--overwrite)")
        self.stream.load_state_dict(ck["stream"])


Feed = IndexFeed | StreamFeed
