"""Data-parallel fine-tuning on 2 gloo processes on CPU: DDP follows one process with the same
global batch (and micro-batches of half of it, each rank's share), FSDP (with activation
checkpointing) follows DDP, and a run cut after a checkpoint resumes as the uninterrupted one;
every rank reports the same metric, rank 0 alone writes; a non-finite loss on one rank makes
every rank skip the step, as one process does.

Run as a script under torchrun, this file is the worker of the slow test (see ``_worker``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from downstream.base import TaskContext, get_task
from downstream.finetune import FinetuneConfig
from harness.core import distributed
from harness.core.config import ConfigError, DataConfig, EncoderConfig
from pretrain.encoders.vit import ViTEncoder

#: Max abs difference allowed between the fine-tuned weights of two process layouts after 6
#: steps. They see the same images, augmentations, mixup / cutmix draws and drop-path masks; only
#: the float32 summation order of the gradients differs (DDP all-reduces two half-batch
#: gradients, FSDP reduce-scatters them), as in the pretraining tests
#: (tests/pretrain/test_ddp.py), whose bound this is.
WEIGHT_ATOL = 2e-6

#: The runs of the worker: name -> config keys beyond :func:`_cfg`'s.
RUNS = {"ddp": {}, "fsdp": {"fsdp": True, "activation_checkpointing": True}}
#: Steps: 3 per epoch (24 train images, batch 8), 6 in all; checkpoints at 2 and 4; the cut runs
#: stop as step 5 starts and resume from step 4 (mid-epoch).
CUT_AT = 5


def _cfg(**keys) -> FinetuneConfig:
    return FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=8, base_lr=0.05,
                          ckpt_every_steps=2, log_every_steps=1, keep_checkpoint=True, **keys)  # fmt: skip


def _encoder() -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(EncoderConfig(arch="vit_micro_32"))


def _run(data: str | Path, out: Path, cfg: FinetuneConfig, log=None):
    ctx = TaskContext(data=DataConfig(source=str(data)), seed=3, device=torch.device("cpu"),
                      out_dir=out, log=log or (lambda m: None))  # fmt: skip
    return get_task("finetune").run(_encoder(), cfg, ctx)


def _worker(out: Path, data: str) -> None:
    """One torchrun worker: DDP and FSDP runs, each also cut at step 5 and resumed; every rank
    writes the metrics it got, rank 0 the resumed runs' logs."""
    from test_finetune_nonfinite import nonfinite_at  # this folder (the script's)
    from torchrun import cut_at  # tests/torchrun.py

    import downstream.finetune as finetune

    torch.set_num_threads(1)
    distributed.init_from_env()
    rank = distributed.get_rank()
    wrap, sizes = finetune._data_parallel, {}

    def recording(model, fsdp, device):  # what each rank holds of each parameter once wrapped
        net = wrap(model, fsdp, device)
        local = [p.to_local().numel() if fsdp else p.numel() for p in model.parameters()]
        sizes["fsdp" if fsdp else "ddp"] = [sum(p.numel() for p in model.parameters()), sum(local)]
        return net

    finetune._data_parallel = recording
    for name, keys in RUNS.items():
        res = _run(data, out / name, _cfg(**keys))
        (out / f"{name}_metrics_rank{rank}.json").write_text(json.dumps(res.metrics))
        if rank == 0:
            (out / f"{name}_details.json").write_text(json.dumps(res.details))
        with cut_at(finetune, CUT_AT):
            _run(data, out / f"{name}_cut", _cfg(**keys))
        lines: list[str] = []
        _run(data, out / f"{name}_cut", _cfg(**keys), log=lines.append)
        if rank == 0:
            (out / f"{name}_cut_log.txt").write_text("\n".join(lines))
    # a non-finite loss on rank 1 alone (its micro-batch of step 2): every rank skips the step
    with nonfinite_at({2} if rank == 1 else set()):
        res = _run(data, out / "skip", _cfg(nonfinite="skip"))
    (out / f"skip_details_rank{rank}.json").write_text(json.dumps(res.details["nonfinite"]))
    if rank == 0:
        (out / "sizes.json").write_text(json.dumps(sizes))
    try:
        _run(data, out / "odd", _cfg(micro_batch_size=3))
    except ConfigError as exc:
        (out / f"odd_error_rank{rank}.txt").write_text(str(exc))
    distributed.cleanup()


def _weights(stage: Path) -> dict[str, torch.Tensor]:
    return torch.load(stage / "classifier.pth", weights_only=True)["state"]


@pytest.mark.slow
def test_finetune_ddp_fsdp_and_resume_match_one_process(tiny_imagefolder, tmp_path):
    from torchrun import run_workers  # tests/torchrun.py
    from weights import max_abs_diff  # tests/weights.py

    out = tmp_path / "runs"
    run_workers(Path(__file__), str(out), str(tiny_imagefolder))
    one = _run(tiny_imagefolder, tmp_path / "one", _cfg(micro_batch_size=4))  # 2 x 4 per step

    w1, ddp, fsdp = _weights(tmp_path / "one"), _weights(out / "ddp"), _weights(out / "fsdp")
    init = {f"encoder.{k}": v for k, v in _encoder().state_dict().items()}
    diffs = {
        "1 process vs DDP": max_abs_diff(w1, ddp),
        "DDP vs FSDP": max_abs_diff(ddp, fsdp),
        "DDP resumed vs DDP": max_abs_diff(ddp, _weights(out / "ddp_cut")),
        "FSDP resumed vs FSDP": max_abs_diff(fsdp, _weights(out / "fsdp_cut")),
    }
    moved = max((w1[k] - v).abs().max().item() for k, v in init.items() if k in w1)
    print("; ".join(f"max |dw| {k} = {v:.3g}" for k, v in diffs.items())
          + f"; training moved encoder weights by {moved:.3g}")  # fmt: skip
    assert all(v <= WEIGHT_ATOL for v in diffs.values()), diffs
    assert moved > 1000 * WEIGHT_ATOL  # not trivially met by barely trained weights

    sizes = json.loads((out / "sizes.json").read_text())  # [global, this rank's] numel
    assert sizes["ddp"][0] == sizes["ddp"][1] == sizes["fsdp"][0]  # DDP: a whole replica
    assert sizes["fsdp"][1] <= 0.6 * sizes["fsdp"][0]  # FSDP: about half on each rank
    for name in RUNS:
        per_rank = [json.loads((out / f"{name}_metrics_rank{r}.json").read_text()) for r in (0, 1)]
        assert per_rank[0] == per_rank[1]  # every rank reports the gathered metric
        for k in ("top1", "top5"):  # one val image (of 12) may flip under float noise
            assert per_rank[0][k] == pytest.approx(one.metrics[k], abs=100 / 12 + 1e-9), name
        details = json.loads((out / f"{name}_details.json").read_text())
        assert details["num_val"] == one.details["num_val"] == 12
        assert details["resolved"]["world_size"] == 2
        assert details["resolved"]["fsdp"] == (name == "fsdp")
        assert details["resolved"]["accum"] == one.details["resolved"]["accum"] == 2
        # the logged loss (the step's last micro-batch, the last rank's) is the 1-process one
        ck = torch.load(out / name / "finetune_checkpoint.pth", weights_only=True)
        ref = torch.load(tmp_path / "one" / "finetune_checkpoint.pth", weights_only=True)
        assert [h["lr"] for h in ck["history"]] == [h["lr"] for h in ref["history"]]
        assert [h["loss"] for h in ck["history"]] == pytest.approx(
            [h["loss"] for h in ref["history"]], rel=1e-5
        )
        # full tensors under the plain model's names, whatever the wrapping
        assert {k: v.shape for k, v in ck["model"].items()} == {
            k: v.shape for k, v in ref["model"].items()
        }
        assert f"resumed at step {CUT_AT - 1}/6" in (out / f"{name}_cut_log.txt").read_text()
    # skip: the step whose second micro-batch (rank 1's) was poisoned, on both layouts
    from test_finetune_nonfinite import nonfinite_at

    with nonfinite_at({5}):  # micro-batch 1 of step 2
        one_skip = _run(tiny_imagefolder, tmp_path / "one_skip", _cfg(micro_batch_size=4,
                                                                      nonfinite="skip"))  # fmt: skip
    skip_diff = max_abs_diff(_weights(tmp_path / "one_skip"), _weights(out / "skip"))
    print(f"max |dw| 1 process vs DDP, a step skipped = {skip_diff:.3g}")
    assert skip_diff <= WEIGHT_ATOL
    for rank in (0, 1):
        nf = json.loads((out / f"skip_details_rank{rank}.json").read_text())
        assert nf == one_skip.details["nonfinite"]
        assert [(e["step"], e["action"]) for e in nf["events"]] == [(2, "skip")]
    for rank in (0, 1):
        msg = (out / f"odd_error_rank{rank}.txt").read_text()
        assert "micro_batch_size 3 must divide batch_size 8 (its 4 per rank" in msg


@pytest.mark.slow
def test_suite_under_torchrun_fine_tunes_on_every_rank(tiny_imagefolder, tmp_path):
    """``mimbench run --launcher torchrun``: fine-tuning and partial fine-tuning (k = 0: the head
    alone trains) on 2 ranks (one record each, written by rank 0), then the process group closes
    and rank 0 alone runs the linear probe."""
    import subprocess

    import yaml

    from harness.core.records import load_records

    suite = {
        "kind": "suite", "name": "ftddp", "output_dir": str(tmp_path / "out"), "seeds": [0],
        "data": {"source": str(tiny_imagefolder), "eval_crop_pct": 1.0},
        "encoders": [{"name": "random", "encoder": {"arch": "vit_micro_32"}}],
        "tasks": [{"name": "finetune", "epochs": 1, "batch_size": 8, "base_lr": 0.05},
                  {"name": "partial_finetune", "epochs": 1, "batch_size": 8, "blocks": [0, 1]},
                  {"name": "linear_probe", "epochs": 2, "batch_size": 8, "lrs": [0.1]}],
    }  # fmt: skip
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    cmd = [sys.executable, "-m", "harness.cli", "run", str(path), "--launcher", "torchrun",
           "--nproc-per-node", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("Leaderboard written to") == 1  # rank 0 alone reports
    records = {r.task.name: r for r in load_records(tmp_path / "out" / "ftddp" / "records")}
    assert sorted(records) == ["finetune", "linear_probe", "partial_finetune"]
    assert all(r.status == "ok" for r in records.values()), [r.error for r in records.values()]
    assert records["finetune"].details["resolved"]["world_size"] == 2
    assert set(records["partial_finetune"].metrics) == {"top1_k0", "top1_k1"}
    assert "world_size" not in records["linear_probe"].details
    logs = [p.read_text() for p in (tmp_path / "out" / "ftddp").rglob("log.txt")]
    # one line per fine-tuning (finetune, partial k = 0 and 1): rank 0 alone writes the logs
    assert sum(t.count("[finetune] val top1") for t in logs) == 3


def test_micro_batch_must_divide_the_batch(tiny_imagefolder, tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size 3 must divide batch_size 8: set"):
        _run(tiny_imagefolder, tmp_path / "odd", _cfg(micro_batch_size=3))


if __name__ == "__main__":  # a torchrun worker of the slow test (PYTHONPATH: the checkout)
    _worker(Path(sys.argv[1]), sys.argv[2])
