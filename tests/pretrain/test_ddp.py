"""Data-parallel pretraining: 2 gloo processes on CPU follow 1 process with the same global batch,
resume exactly, and refuse a global batch that does not split evenly.

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
from harness.core.config import ConfigError, PretrainConfig
from harness.launch import TorchrunOptions, torchrun_command
from pretrain.engine import local_batch_size

ROOT = Path(__file__).resolve().parents[2]

#: Max abs difference allowed between the encoder weights of 2 ranks x B/2 and 1 process x B.
#: Both runs see the same images and masks; only float32 summation order differs (DDP averages
#: two half-batch gradients, one process averages the whole batch), ~1e-7 relative per step,
#: which AdamW's normalized updates carry into the weights (measured: 3e-7 after 6 steps, MAE;
#: 1e-7, SimMIM; weights move by 3e-3). A real mismatch (DDP with static_graph=True, whose
#: cls-token gradient was wrong) gave 5e-3.
WEIGHT_ATOL = 2e-6
#: Relative tolerance on the logged losses (the mean of two half-batch means vs the batch mean).
LOSS_RTOL = 1e-5


def _cfg(data: str | Path, recipe: str = "mae", **train) -> dict:
    t = {
        "epochs": 1,
        "warmup_epochs": 0.5,
        "batch_size": 4,
        "base_lr": 1e-3,
        "lr_base_batch": 4,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "num_recon_images": 2,
        **train,
    }
    rec: dict = {"name": recipe}
    if recipe == "simmim":
        rec["masking"] = {"mask_patch_size": 16}
    else:
        rec["head"] = {"depth": 1, "dim": 32, "num_heads": 2}
    return {
        "kind": "pretrain",
        "name": f"ddp-{recipe}",
        "seed": 5,
        "data": {"source": str(data)},
        "encoder": {"arch": "vit_micro_32"},
        "recipe": rec,
        "train": t,
    }


def _pcfg(raw: dict) -> PretrainConfig:
    return PretrainConfig(**{k: v for k, v in raw.items() if k != "kind"})


def _worker(out: Path, data: str) -> None:
    """One torchrun worker: for each recipe, an uninterrupted run, a run cut at step 5 then
    resumed, and a global batch of 5 on 2 ranks (which must be refused)."""
    from torchrun import cut_at  # tests/torchrun.py

    import pretrain.engine as engine

    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.get_rank()
    for recipe in ("mae", "simmim"):
        cfg = _pcfg(_cfg(data, recipe))
        engine.pretrain(cfg, out / recipe / "full", log=lambda m: None)
        with cut_at(engine, 5):  # step 4's checkpoint is on disk; every rank stops here
            engine.pretrain(cfg, out / recipe / "cut", log=lambda m: None)
        assert not (out / recipe / "cut" / "summary.json").exists()
        lines: list[str] = []
        engine.pretrain(cfg, out / recipe / "cut", resume=True, log=lines.append)
        if rank == 0:
            (out / recipe / "resume_log.txt").write_text("\n".join(lines))
    try:
        engine.pretrain(_pcfg(_cfg(data, batch_size=5)), out / "odd", log=lambda m: None)
    except ConfigError as exc:
        (out / f"odd_error_rank{rank}.txt").write_text(str(exc))
    distributed.cleanup()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _losses(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_resume_exactly(tiny_imagefolder, tmp_path):
    from torchrun import run_workers  # tests/torchrun.py
    from weights import max_abs_diff  # tests/weights.py (pytest puts tests/ on the path)

    from pretrain.engine import pretrain

    out = tmp_path / "ddp"
    run_workers(Path(__file__), str(out), str(tiny_imagefolder), timeout=600)

    for recipe in ("mae", "simmim"):
        ref = pretrain(
            _pcfg(_cfg(tiny_imagefolder, recipe)), tmp_path / "one" / recipe, log=lambda m: None
        )
        full = out / recipe / "full"
        a, b = _state(ref.encoder_path), _state(full / "encoder.pth")
        assert a.keys() == b.keys()
        diff = max_abs_diff(a, b)  # key biases left out: their true gradient is zero
        moved = max((a[k].float() - _state_init(recipe)[k].float()).abs().max().item() for k in a)
        print(
            f"{recipe}: max |w_1proc - w_2ranks| = {diff:.3g} (training moved weights by {moved:.3g})"
        )
        assert diff <= WEIGHT_ATOL, recipe
        # the comparison is not trivially met by barely trained weights
        assert moved > 1000 * WEIGHT_ATOL
        la, lb = _losses(ref.out_dir / "loss.jsonl"), _losses(full / "loss.jsonl")
        assert [h["step"] for h in la] == [h["step"] for h in lb] == list(range(1, 7))
        assert [h["lr"] for h in la] == [h["lr"] for h in lb]
        for x, y in zip(la, lb, strict=True):
            assert y["loss"] == pytest.approx(x["loss"], rel=LOSS_RTOL)
        # rank 0 wrote everything once; the checkpoint holds every rank's RNG state
        ck = torch.load(full / "checkpoint.pth", weights_only=True)
        assert ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
        assert json.loads((full / "summary.json").read_text())["world_size"] == 2
        assert (full / "recon.png").is_file()
        # resumed under DDP from the step-4 checkpoint: bitwise the uninterrupted DDP run
        cut = out / recipe / "cut"
        assert "resumed at step 4" in (out / recipe / "resume_log.txt").read_text()
        c = _state(cut / "encoder.pth")
        assert all(torch.equal(b[k], c[k]) for k in b)
        assert (cut / "loss.jsonl").read_text() == (full / "loss.jsonl").read_text()

    for rank in (0, 1):
        msg = (out / f"odd_error_rank{rank}.txt").read_text()
        assert "batch_size=5" in msg and "not divisible" in msg and "multiple of 2" in msg


@pytest.mark.slow
def test_run_suite_with_the_torchrun_launcher(tiny_imagefolder, tmp_path):
    """``mimbench run --launcher torchrun``: pretraining on 2 ranks, tasks and report on rank 0."""
    import yaml

    suite = {
        "kind": "suite",
        "name": "ddp",
        "output_dir": str(tmp_path / "out"),
        "seeds": [0],
        "data": {"source": str(tiny_imagefolder), "eval_crop_pct": 1.0},
        "encoders": [
            {
                "name": "mae",
                "encoder": {"arch": "vit_micro_32"},
                "pretrain": {
                    "recipe": _cfg(".")["recipe"],
                    "train": {"epochs": 1, "batch_size": 8, "num_recon_images": 0},
                },
            }
        ],
        "tasks": [{"name": "linear_probe", "epochs": 2, "batch_size": 8, "lrs": [0.1]}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(path),
        "--launcher",
        "torchrun",
        "--nproc-per-node",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ranks=2 (batch 4 each)" in proc.stdout
    assert proc.stdout.count("Leaderboard written to") == 1  # rank 0 alone reports
    assert len(list((tmp_path / "out" / "ddp" / "records").glob("*.json"))) == 1
    (stage,) = (tmp_path / "out" / "ddp" / "pretrain").iterdir()
    assert json.loads((stage / "summary.json").read_text())["world_size"] == 2


def _state_init(recipe: str) -> dict[str, torch.Tensor]:
    """The encoder weights before training (the engine seeds torch with the config's seed)."""
    from pretrain.model import create_model

    cfg = _pcfg(_cfg(".", recipe))  # the encoder resolved with the recipe's defaults, as the run's
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.encoder, cfg.recipe)
    return {k: v.detach() for k, v in model.encoder.timm_state_dict().items()}


def test_global_batch_must_split_evenly():
    assert (
        local_batch_size(8, 1) == 8 and local_batch_size(8, 2) == 4 and local_batch_size(12, 4) == 3
    )
    with pytest.raises(
        ConfigError,
        match=r"batch_size=10 .*not divisible by the 4 processes.*"
        r"multiple of 4 \(e.g. 8 or 12\)",
    ):
        local_batch_size(10, 4)


def test_helpers_are_single_process_noops(monkeypatch):
    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_from_env() == distributed.DistEnv(0, 1, 0)
    assert not distributed.is_initialized()
    assert (
        distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.is_main()
    )
    assert distributed.all_reduce_mean(torch.tensor(2.5)) == 2.5
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup()


def test_env_errors_name_the_fix(monkeypatch):
    from harness.core.errors import UserError

    for k in distributed.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match="RANK and WORLD_SIZE must be set together"):
        distributed.env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.env() == distributed.DistEnv(1, 2, 1)
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT is not set.*torchrun"):
        distributed.init_from_env()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="outside"):
        distributed.env()


def test_torchrun_command_single_and_multi_node():
    cmd = torchrun_command(["run", "s.yaml", "--launcher", "inprocess"], TorchrunOptions(4))
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        "--standalone",
        "-m",
        "harness.cli",
        "run",
        "s.yaml",
        "--launcher",
        "inprocess",
    ]
    cmd = torchrun_command(
        ["run", "s.yaml"],
        TorchrunOptions(8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600),
    )
    assert "--standalone" not in cmd
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29600"} <= set(
        cmd
    )
    from harness.core.errors import UserError

    with pytest.raises(UserError, match="needs --master-addr"):
        torchrun_command([], TorchrunOptions(2, nnodes=2))
    with pytest.raises(UserError, match="--node-rank 2 is outside"):
        torchrun_command([], TorchrunOptions(2, nnodes=2, node_rank=2, master_addr="h"))


if __name__ == "__main__":  # a torchrun worker of the slow test (PYTHONPATH: the checkout)
    _worker(Path(sys.argv[1]), sys.argv[2])
