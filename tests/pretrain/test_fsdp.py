"""FSDP pretraining (``train.fsdp``, with activation checkpointing) on 2 gloo processes on CPU:
the weights equal DDP's up to float rounding, a resumed FSDP run continues exactly as the
uninterrupted one, and gradient accumulation under DDP equals the whole local batch.

Run as a script under torchrun, this file is the worker of the slow test (see ``_worker``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from harness.core import distributed
from harness.core.config import PretrainConfig

#: Max abs difference allowed between FSDP's and DDP's encoder weights after 6 steps. Both see the
#: same images and masks; FSDP reduce-scatters what DDP all-reduces (float32 summation order
#: only); the DDP test's bound (tests/pretrain/test_ddp.py) holds for the same reason.
WEIGHT_ATOL = 2e-6


def _cfg(data: str | Path, name: str, **train) -> PretrainConfig:
    t = {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 4, "base_lr": 1e-3,
         "lr_base_batch": 4, "ckpt_every_steps": 2, "log_every_steps": 1,
         "num_recon_images": 2, **train}  # fmt: skip
    return PretrainConfig(
        name=name, seed=5, data={"source": str(data)}, encoder={"arch": "vit_micro_32"},
        recipe={"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}}, train=t,
    )  # fmt: skip


#: The runs of the worker: name -> train keys.
RUNS = {
    "ddp": {},
    "fsdp": {"fsdp": True, "activation_checkpointing": True},
    "ddp_accum": {"accum_steps": 2},
}


def _worker(out: Path, data: str) -> None:
    """One torchrun worker: DDP, FSDP (+ activation checkpointing), DDP with 2 micro-batches per
    rank, and an FSDP run cut after step 4's checkpoint then resumed."""
    from torchrun import cut_at  # tests/torchrun.py

    import pretrain.engine as engine

    torch.set_num_threads(1)
    distributed.init_from_env()
    shard, sizes = engine._shard, []

    def recording_shard(run, blocks):  # what each rank holds of each parameter once sharded
        shard(run, blocks)
        sizes[:] = [(p.numel(), p.to_local().numel()) for p in run.model.parameters()]

    engine._shard = recording_shard
    for name, train in RUNS.items():
        engine.pretrain(_cfg(data, name, **train), out / name, log=lambda m: None)
    cfg = _cfg(data, "fsdp", **RUNS["fsdp"])
    with cut_at(engine, 5):  # step 4's checkpoint is on disk; every rank stops here
        engine.pretrain(cfg, out / "fsdp_cut", log=lambda m: None)
    lines: list[str] = []
    engine.pretrain(cfg, out / "fsdp_cut", resume=True, log=lines.append)
    if distributed.get_rank() == 0:
        (out / "resume_log.txt").write_text("\n".join(lines))
        (out / "shard_sizes.json").write_text(json.dumps(sizes))
    distributed.cleanup()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    from weights import max_abs_diff  # tests/weights.py (pytest puts tests/ on the path)

    return max_abs_diff(a, b)


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes_exactly(tiny_imagefolder, tmp_path):
    from torchrun import run_workers  # tests/torchrun.py

    out = tmp_path / "runs"
    run_workers(Path(__file__), str(out), str(tiny_imagefolder))

    ddp, fsdp = _state(out / "ddp" / "encoder.pth"), _state(out / "fsdp" / "encoder.pth")
    init = _state_init()
    diff, moved = _max_diff(ddp, fsdp), _max_diff(ddp, init)
    accum = _max_diff(ddp, _state(out / "ddp_accum" / "encoder.pth"))
    print(f"max |w_fsdp - w_ddp| = {diff:.3g}; DDP accum 2 vs 1: {accum:.3g}; "
          f"training moved weights by {moved:.3g}")  # fmt: skip
    assert diff <= WEIGHT_ATOL and accum <= WEIGHT_ATOL
    assert moved > 1000 * WEIGHT_ATOL  # not trivially met by barely trained weights
    summary = json.loads((out / "fsdp" / "summary.json").read_text())
    assert summary["compute"]["fsdp"] and summary["compute"]["activation_checkpointing"]
    assert summary["world_size"] == 2
    sizes = json.loads((out / "shard_sizes.json").read_text())  # (global, this rank's) numel
    assert sum(g for g, _ in sizes) == sum(v.numel() for v in _model_init().parameters())
    assert sum(mine for _, mine in sizes) <= 0.6 * sum(g for g, _ in sizes)  # about half each
    assert json.loads((out / "ddp_accum" / "summary.json").read_text())["compute"]["accum_steps"] == 2
    # the checkpoint holds full tensors under the plain model's names (what export reads)
    ck = torch.load(out / "fsdp" / "checkpoint.pth", weights_only=True)
    plain = torch.load(out / "ddp" / "checkpoint.pth", weights_only=True)
    assert {k: v.shape for k, v in ck["model"].items()} == {
        k: v.shape for k, v in plain["model"].items()
    }
    assert (out / "fsdp" / "recon.png").is_file()
    # resumed under FSDP from step 4: the uninterrupted FSDP run
    assert "resumed at step 4" in (out / "resume_log.txt").read_text()
    resumed = _state(out / "fsdp_cut" / "encoder.pth")
    print(f"max |w_fsdp_resumed - w_fsdp| = {_max_diff(fsdp, resumed):.3g}")
    assert _max_diff(fsdp, resumed) <= WEIGHT_ATOL
    full_loss = (out / "fsdp" / "loss.jsonl").read_text().splitlines()
    cut_loss = (out / "fsdp_cut" / "loss.jsonl").read_text().splitlines()
    assert len(full_loss) == len(cut_loss) == 6
    for x, y in zip(full_loss, cut_loss, strict=True):
        assert json.loads(y)["loss"] == pytest.approx(json.loads(x)["loss"], rel=1e-6)


def _model_init() -> torch.nn.Module:
    """The model before training (the engine seeds torch with the config's seed)."""
    from pretrain.model import create_model

    cfg = _cfg(".", "init")
    torch.manual_seed(cfg.seed)
    return create_model(cfg.encoder, cfg.recipe)


def _state_init() -> dict[str, torch.Tensor]:
    """The encoder weights before training."""
    return {k: v.detach() for k, v in _model_init().encoder.timm_state_dict().items()}


if __name__ == "__main__":  # a torchrun worker of the slow test (PYTHONPATH: the checkout)
    _worker(Path(sys.argv[1]), sys.argv[2])
