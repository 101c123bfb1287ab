"""The engine's loader: persistent workers keep each epoch's order, and streaming pretraining
(``data.stream``) resumes mid-epoch in the uninterrupted order, refusing other worker or rank
counts; a stream on an ImageFolder is refused naming the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydantic
import pytest
import torch

from harness.core.config import DataConfig, PretrainConfig, dump_config
from harness.core.data.datasets import DatasetError, SkipTally
from harness.core.data.shards import ShardImageFolder, ShardResumeError, write_shards
from harness.core.fsutil import pretrain_config_hash
from pretrain.engine import pretrain


def _cfg(source: Path, workers: int = 0, stream: bool = False, **train) -> PretrainConfig:
    data: dict = {"source": str(source), "num_workers": workers}
    if stream:
        data |= {"stream": True, "shuffle_buffer": 4}
    t = {"epochs": 2, "warmup_epochs": 1, "batch_size": 4, "base_lr": 1e-3, "lr_base_batch": 4,
         "ckpt_every_steps": 3, "log_every_steps": 1, "num_recon_images": 0, **train}  # fmt: skip
    return PretrainConfig(data=data, encoder={"arch": "vit_micro_32"},
                          recipe={"name": "simmim", "masking": {"mask_patch_size": 16}}, train=t)  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "loss.jsonl").read_text().splitlines()]


@pytest.fixture()
def batches(monkeypatch) -> list[list[int]]:
    """The sample indices of every batch the engine's steps read, in order."""
    seen: list[list[int]] = []
    add = SkipTally.add

    def record(self, indices, kept):
        seen.append([int(i) for i in indices])
        return add(self, indices, kept)

    monkeypatch.setattr(SkipTally, "add", record)
    return seen


@pytest.fixture()
def shards(tiny_imagefolder, tmp_path) -> Path:
    write_shards(tiny_imagefolder, tmp_path / "s", shard_size=3, log=lambda m: None)  # 8 shards
    return tmp_path / "s"


def test_persistent_workers_keep_each_epochs_order(tiny_imagefolder, tmp_path, batches):
    """One loader for the run, 2 persistent workers: the batches and losses of every epoch
    are those of the main-process loader (a worker's copy of the dataset never sees
    set_epoch: the epoch travels with each sample's key)."""
    pretrain(_cfg(tiny_imagefolder), tmp_path / "w0", log=lambda m: None)
    main = list(batches)
    batches.clear()
    pretrain(_cfg(tiny_imagefolder, workers=2), tmp_path / "w2", log=lambda m: None)
    assert len(main) == 12 and batches == main  # 24 images / 4 x 2 epochs
    assert sorted(sum(main[:6], [])) == list(range(24)) and main[:6] != main[6:]
    assert _losses(tmp_path / "w0") == _losses(tmp_path / "w2")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_mid_epoch_in_the_uninterrupted_order(shards, tmp_path, batches, workers):
    cfg = _cfg(shards, workers, stream=True)
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)
    keys = list(batches)
    assert full.steps == 12 and len(keys) == 12  # every slot's shards hold whole batches here
    names = [os.path.relpath(p, ShardImageFolder(shards, "train").root)
             for p, _ in ShardImageFolder(shards, "train").samples]  # fmt: skip
    epoch0, epoch1 = sum(keys[:6], []), sum(keys[6:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(24)) and epoch0 != epoch1
    if workers == 2:  # batch j of an epoch comes from worker j % 2, whose shards are its own
        shard = [{names[i].split("/")[0] for i in b} for b in keys[:6]]
        assert not (set().union(*shard[0::2]) & set().union(*shard[1::2]))

    class Interrupt(Exception):
        pass

    def killer(msg: str) -> None:
        if "step 8/" in msg:  # after the step-6 checkpoint, mid-epoch 1
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "cut", log=killer)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert ck["step"] == 6 and ck["stream"]["epoch"] == 1 and ck["stream"]["batches"] == 0
    batches.clear()
    lines: list[str] = []
    pretrain(cfg, tmp_path / "cut", resume=True, log=lines.append)
    assert any("resumed at step 6" in m for m in lines)
    assert batches == keys[6:]  # the same samples, in the same batches
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")


def test_stream_resume_refuses_other_worker_or_rank_counts(shards, tmp_path):
    out = tmp_path / "o"
    pretrain(_cfg(shards, stream=True, max_steps=3, epochs=1), out, log=lambda m: None)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ShardResumeError, match=r"workers 1 -> 2.*resume with 1 rank\(s\) and 1 "):
        pretrain(_cfg(shards, workers=2, stream=True, max_steps=3, epochs=1), out)
    assert (out / "config.yaml").read_text() == before  # refused before any write
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    ck["stream"]["world"] = 2  # as if written by a 2-rank run
    torch.save(ck, out / "checkpoint.pth")
    with pytest.raises(ShardResumeError, match="world 2 -> 1"):
        pretrain(_cfg(shards, stream=True, max_steps=3, epochs=1), out)


def test_stream_keys_default_out_of_dumps_and_num_workers_out_of_its_hash(shards):
    plain = DataConfig(source="x").model_dump(mode="json")
    assert "stream" not in plain and "shuffle_buffer" not in plain
    on = [_cfg(shards, w, stream=True) for w in (0, 2)]
    off = [_cfg(shards, w) for w in (0, 2)]
    assert "stream: true" in dump_config(on[0]) and "num_workers: 2" in dump_config(on[1])
    hashes = [pretrain_config_hash(c.model_dump(mode="json")) for c in on + off]
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3


def test_stream_on_an_imagefolder_is_refused_naming_the_fix(tiny_imagefolder, tmp_path):
    with pytest.raises(pydantic.ValidationError, match="mimbench data shard"):
        DataConfig(source="shapes", stream=True)
    with pytest.raises(pydantic.ValidationError, match="mimbench data shard"):
        DataConfig(source=str(tiny_imagefolder), layout="imagefolder", stream=True)
    with pytest.raises(pydantic.ValidationError, match="set data.stream: true"):
        DataConfig(source=str(tiny_imagefolder), shuffle_buffer=10)
    with pytest.raises(DatasetError, match=f"mimbench data shard {tiny_imagefolder} --out"):
        pretrain(_cfg(tiny_imagefolder, stream=True), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_index_feed_with_persistent_workers_gives_each_epochs_augmentation(tiny_imagefolder):
    """Every batch of every epoch, from 2 persistent workers and prefetching, holds the images
    the seeded dataset gives in the main process with ``set_epoch`` (the reference), and a
    resumed epoch starts at its batch."""
    from harness.core.data.datasets import (
        SeededDataset,
        imagefolder_checked,
        pretrain_transform,
    )
    from pretrain.feed import IndexFeed

    base = imagefolder_checked(tiny_imagefolder, "train", pretrain_transform(16, (0.2, 1.0), True))
    feed = IndexFeed(SeededDataset(base, 3), 8, 8, 0, 1, 2, torch.device("cpu"))
    ref = SeededDataset(base, 3)
    assert feed.loader.persistent_workers and feed.steps_per_epoch == 3
    seen = {}
    for epoch, start in ((0, 0), (1, 0), (2, 1)):
        ref.set_epoch(epoch)
        got = list(feed.epoch(epoch, start))
        assert len(got) == 3 - start
        for imgs, kept, indices in got:
            assert bool(kept.all()) and len(indices) == 8
            assert torch.equal(imgs, torch.stack([ref[i][0] for i in indices]))
        seen[epoch] = {i: img for imgs, _, idx in got for i, img in zip(idx, imgs, strict=True)}
    assert not torch.equal(seen[0][0], seen[1][0])  # each epoch its own crops


@pytest.mark.slow
def test_stream_sigkill_mid_epoch_then_resume_is_bitwise_identical(shards, tmp_path):
    """Streaming with 2 persistent workers, killed with SIGKILL mid-epoch and resumed: the
    weights and the loss curve of the uninterrupted run, bitwise (CPU)."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    cfg = _cfg(shards, workers=2, stream=True, epochs=20, ckpt_every_steps=4)
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    cmd = [sys.executable, "-m", "harness.cli", "pretrain", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert yaml.safe_load(path.read_text())["data"]["stream"] is True
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if (cut / "checkpoint.pth").exists():
            step = torch.load(cut / "checkpoint.pth", weights_only=True)["step"]  # atomic writes
            if step >= 40 and step % 6:  # mid-epoch (6 steps an epoch)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_at = step
                break
        time.sleep(0.005)
    assert killed_at is not None, "the run ended before it could be killed"
    assert not (cut / "summary.json").exists()
    subprocess.run([*cmd, "--out", str(cut), "--resume"], check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    a = torch.load(tmp_path / "full" / "encoder.pth", weights_only=True)["state_dict"]
    b = torch.load(cut / "encoder.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "loss.jsonl").read_text() == (cut / "loss.jsonl").read_text()
