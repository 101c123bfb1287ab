"""Streaming pretraining on 2 gloo ranks (CPU): each rank streams its own shards, a run cut
mid-epoch resumes bitwise with every rank's sample order, and one process refuses to continue
the 2-rank stream.

Run as a script under torchrun, this file is the worker of the slow test (see ``_worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.core import distributed
from harness.core.config import PretrainConfig
from harness.core.data.datasets import SkipTally
from harness.launch import TorchrunOptions, torchrun_command

ROOT = Path(__file__).resolve().parents[2]


def _cfg(shards: str | Path) -> PretrainConfig:
    return PretrainConfig(
        seed=5, data={"source": str(shards), "stream": True, "shuffle_buffer": 4},
        encoder={"arch": "vit_micro_32"}, recipe={"name": "simmim", "masking": {"mask_patch_size": 16}},
        train={"epochs": 2, "warmup_epochs": 0.5, "batch_size": 4, "base_lr": 1e-3,
               "lr_base_batch": 4, "ckpt_every_steps": 2, "log_every_steps": 1,
               "num_recon_images": 0},
    )  # fmt: skip


class _Cut(Exception):
    """Raised on every rank at the same step to simulate a crash after a checkpoint."""


def _worker(out: Path, shards: str) -> None:
    """One torchrun worker: an uninterrupted run and a run cut at step 5 (mid-epoch 0) then
    resumed, writing the sample indices of each of its steps."""
    import pretrain.engine as engine

    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.get_rank()
    seen: list[list[int]] = []
    add = SkipTally.add

    def record(self, indices, kept):
        seen.append([int(i) for i in indices])
        return add(self, indices, kept)

    SkipTally.add = record  # type: ignore[method-assign]
    cfg = _cfg(shards)
    engine.pretrain(cfg, out / "full", log=lambda m: None)
    (out / f"full_keys{rank}.json").write_text(json.dumps(seen))
    original = engine.lr_at

    def cut_at_5(step, *a, **k):
        if step == 5:  # step 4's checkpoint is on disk; every rank stops here
            raise _Cut
        return original(step, *a, **k)

    engine.lr_at = cut_at_5
    try:
        engine.pretrain(cfg, out / "cut", log=lambda m: None)
    except _Cut:
        pass
    finally:
        engine.lr_at = original
    seen.clear()
    engine.pretrain(cfg, out / "cut", resume=True, log=lambda m: None)
    (out / f"cut_keys{rank}.json").write_text(json.dumps(seen))
    distributed.cleanup()


@pytest.mark.slow
def test_two_gloo_ranks_stream_their_shards_and_resume_exactly(tiny_imagefolder, tmp_path):
    from harness.core.data.shards import ShardImageFolder, ShardResumeError, write_shards
    from pretrain.engine import pretrain

    shards = tmp_path / "s"
    write_shards(tiny_imagefolder, shards, shard_size=3, log=lambda m: None)  # 8 shards
    out = tmp_path / "ddp"
    cmd = torchrun_command([], TorchrunOptions(nproc_per_node=2))
    cmd = [*cmd[: cmd.index("-m", 3)], str(Path(__file__)), str(out), str(shards)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    keys = [json.loads((out / f"full_keys{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 12  # 4 shards x 3 samples per rank / 2 x 2 epochs
    ds = ShardImageFolder(shards, "train")
    shard_of = [os.path.relpath(p, ds.root).split("/")[0] for p, _ in ds.samples]
    for epoch in (0, 1):
        mine = [sum(k[epoch * 6 : epoch * 6 + 6], []) for k in keys]
        assert sorted(mine[0] + mine[1]) == list(range(24))  # every sample once an epoch
        assert not {shard_of[i] for i in mine[0]} & {shard_of[i] for i in mine[1]}
    for r in (0, 1):  # resumed at step 4: each rank's batches from there on
        assert json.loads((out / f"cut_keys{r}.json").read_text()) == keys[r][4:]
    a = torch.load(out / "full" / "encoder.pth", weights_only=True)["state_dict"]
    b = torch.load(out / "cut" / "encoder.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "full" / "loss.jsonl").read_text() == (out / "cut" / "loss.jsonl").read_text()
    assert torch.load(out / "cut" / "checkpoint.pth", weights_only=True)["stream"]["world"] == 2
    with pytest.raises(ShardResumeError, match="world 2 -> 1.*resume with 2 rank"):
        pretrain(_cfg(shards), out / "cut", resume=True, log=lambda m: None)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
