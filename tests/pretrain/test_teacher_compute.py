"""An EMA teacher under the compute options: FSDP on 2 gloo processes on CPU gives DDP's weights,
the teacher's included, and a resumed FSDP run continues exactly; ``train.compile`` with a
teacher follows the eager run or falls back to it with one warning.

Run as a script under torchrun, this file is the worker of the FSDP test (see ``_worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.core import distributed, parallel
from harness.core.config import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]

#: As tests/pretrain/test_fsdp.py: FSDP reduce-scatters what DDP all-reduces (float32 summation
#: order only); the teacher is a moving average of those weights, so the same bound holds.
WEIGHT_ATOL = 2e-6

#: data2vec on the micro ViT (2 blocks: top 2 of them), block masks of half the patches, and a
#: teacher of momentum 0.5 so that 6 steps move it as far as the student (at data2vec's 0.999
#: it moves by about 5e-6, within the comparison's tolerance: a check that could not fail)
D2V = {"name": "data2vec", "masking": {"min_block_patches": 2, "ratio": 0.5},
       "target": {"latent": {"top_k": 2}}, "teacher": {"momentum": 0.5, "momentum_end": 0.5}}  # fmt: skip


def _cfg(data: str | Path, name: str, **train) -> PretrainConfig:
    t = {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 4, "base_lr": 1e-3,
         "lr_base_batch": 4, "ckpt_every_steps": 2, "log_every_steps": 1,
         "num_recon_images": 2, **train}  # fmt: skip
    return PretrainConfig(name=name, seed=5, data={"source": str(data)},
                          encoder={"arch": "vit_micro_32"}, recipe=D2V, train=t)  # fmt: skip


class _Cut(Exception):
    """Raised on every rank at the same step to simulate a crash after a checkpoint."""


def _worker(out: Path, data: str) -> None:
    """One torchrun worker: DDP, FSDP (+ activation checkpointing), and FSDP cut after step 4's
    checkpoint then resumed."""
    import pretrain.engine as engine

    torch.set_num_threads(1)
    distributed.init_from_env()
    fsdp = {"fsdp": True, "activation_checkpointing": True}
    engine.pretrain(_cfg(data, "ddp"), out / "ddp", log=lambda m: None)
    engine.pretrain(_cfg(data, "fsdp", **fsdp), out / "fsdp", log=lambda m: None)
    original = engine.lr_at

    def cut_at_5(step, *a, original=original, **k):
        if step == 5:  # step 4's checkpoint is on disk; every rank stops here
            raise _Cut
        return original(step, *a, **k)

    engine.lr_at = cut_at_5
    try:
        engine.pretrain(_cfg(data, "fsdp", **fsdp), out / "fsdp_cut", log=lambda m: None)
    except _Cut:
        pass
    finally:
        engine.lr_at = original
    lines: list[str] = []
    engine.pretrain(_cfg(data, "fsdp", **fsdp), out / "fsdp_cut", resume=True, log=lines.append)
    if distributed.get_rank() == 0:
        (out / "resume_log.txt").write_text("\n".join(lines))
    distributed.cleanup()


def _model(path: Path) -> dict[str, torch.Tensor]:
    """The whole model of a final checkpoint (student, teacher, head), full tensors."""
    return torch.load(path / "checkpoint.pth", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    from weights import max_abs_diff  # tests/weights.py (pytest puts tests/ on the path)

    return max_abs_diff(a, b)


def _teacher(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("target.teacher.")}


@pytest.mark.slow
def test_fsdp_with_a_teacher_matches_ddp_and_resumes_exactly(tiny_imagefolder, tmp_path):
    from harness.launch import TorchrunOptions, torchrun_command

    out = tmp_path / "runs"
    cmd = torchrun_command([], TorchrunOptions(nproc_per_node=2))
    cmd = [*cmd[: cmd.index("-m", 3)], str(Path(__file__)), str(out), str(tiny_imagefolder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ddp, fsdp = _model(out / "ddp"), _model(out / "fsdp")
    assert ddp.keys() == fsdp.keys() and _teacher(ddp)  # the teacher is in the checkpoint
    init = _initial_model()
    diff, moved = _max_diff(ddp, fsdp), _max_diff(_teacher(ddp), _teacher(init))
    print(f"max |model_fsdp - model_ddp| = {diff:.3g} (teacher: "
          f"{_max_diff(_teacher(ddp), _teacher(fsdp)):.3g}); the teacher moved by {moved:.3g}")  # fmt: skip
    assert diff <= WEIGHT_ATOL
    assert moved > 1000 * WEIGHT_ATOL  # the EMA updates moved the teacher
    summary = json.loads((out / "fsdp" / "summary.json").read_text())
    assert summary["compute"]["fsdp"] and summary["world_size"] == 2
    # resumed under FSDP from step 4: the uninterrupted FSDP run, teacher included
    assert "resumed at step 4" in (out / "resume_log.txt").read_text()
    resumed = _model(out / "fsdp_cut")
    print(f"max |model_fsdp_resumed - model_fsdp| = {_max_diff(fsdp, resumed):.3g}")
    assert _max_diff(fsdp, resumed) <= WEIGHT_ATOL
    full = (out / "fsdp" / "loss.jsonl").read_text().splitlines()
    cut = (out / "fsdp_cut" / "loss.jsonl").read_text().splitlines()
    assert len(full) == len(cut) == 6
    for x, y in zip(full, cut, strict=True):
        assert json.loads(y)["loss"] == pytest.approx(json.loads(x)["loss"], rel=1e-6)


def _initial_model() -> dict[str, torch.Tensor]:
    """The model's state before training (the engine seeds torch with the config's seed)."""
    from pretrain.model import create_model

    cfg = _cfg(".", "init")
    torch.manual_seed(cfg.seed)
    return {k: v.detach() for k, v in create_model(cfg.encoder, cfg.recipe).state_dict().items()}


# --------------------------------------------------------------------------- compile


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler on this machine (simulated)")


@pytest.mark.slow
def test_compile_with_a_teacher_follows_eager_or_falls_back(tiny_imagefolder, tmp_path, monkeypatch):
    """``aot_eager`` (Dynamo + AOTAutograd without inductor's C++ code generation): the
    compiled data2vec run gives the eager weights, the teacher's included; a backend that fails
    leaves one warning and the eager run's weights bit for bit."""
    from pretrain.engine import pretrain

    def run(name: str, **train) -> dict[str, torch.Tensor]:
        cfg = _cfg(tiny_imagefolder, name, max_steps=3, num_recon_images=0, **train)
        pretrain(cfg, tmp_path / name, log=lines.append)
        return _model(tmp_path / name)

    lines: list[str] = []
    eager = run("eager")
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")
    compiled = run("compiled", compile=True)
    compute = json.loads((tmp_path / "compiled" / "summary.json").read_text())["compute"]
    assert compute["compiled"] and compute["compile_error"] is None, compute
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    assert _max_diff(_teacher(compiled), _teacher(eager)) <= 1e-5

    monkeypatch.setattr(parallel, "COMPILE_BACKEND", _failing_backend)
    lines.clear()
    fell_back = run("fallback", compile=True)
    warnings = [x for x in lines if "WARNING" in x]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0], lines
    compute = json.loads((tmp_path / "fallback" / "summary.json").read_text())["compute"]
    assert compute["compile"] and not compute["compiled"] and compute["compile_error"]
    assert all(torch.equal(eager[k], fell_back[k]) for k in eager)


if __name__ == "__main__":  # a torchrun worker of the FSDP test (PYTHONPATH: the checkout)
    _worker(Path(sys.argv[1]), sys.argv[2])
