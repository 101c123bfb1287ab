"""The shared training utilities (harness.core.training): seeded order under resume, the lr
schedule against its formula, gradient accumulation against one large batch, and the one
resume policy (a checkpoint of another config is refused) in each of the three training loops."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from downstream.base import TaskContext, get_task
from downstream.finetune import FinetuneConfig
from downstream.linear_probe_faithful import LinearProbeFaithfulConfig
from harness.core.config import DataConfig, EncoderConfig, PretrainConfig
from harness.core.errors import CheckpointError, UserError
from harness.core.training import (
    GradAccumulation,
    ResumableCheckpoint,
    epoch_batches,
    epoch_order,
    lr_at,
    set_lr,
    split_batch,
    steps_per_epoch,
)
from pretrain.encoders.vit import ViTEncoder
from pretrain.engine import CHECKPOINT, pretrain

# --------------------------------------------------------------------------- seeded order


def _stream(n: int, seed: int, batch: int, start_step: int, steps: int) -> list[list[int]]:
    """The batches a run reads from ``start_step`` until ``steps``, resuming there."""
    spe = n // batch
    out: list[list[int]] = []
    step = start_step
    while step < steps:
        epoch, b = divmod(step, spe)
        for idx in epoch_batches(n, seed, epoch, batch, b):
            out.append(idx)
            step += 1
            if step == steps:
                break
    return out


@pytest.mark.parametrize("resume_at", [1, 4, 5, 9])
def test_order_after_resume_equals_the_uninterrupted_order(resume_at):
    n, batch, steps = 22, 4, 13  # 5 full batches per epoch, 2 samples dropped each epoch
    full = _stream(n, seed=3, batch=batch, start_step=0, steps=steps)
    assert len(full) == steps and all(len(b) == batch for b in full)
    assert _stream(n, 3, batch, resume_at, steps) == full[resume_at:]
    # each epoch reads distinct samples; the next epoch is another permutation
    assert len(set(sum(full[:5], []))) == 20
    assert full[:5] != full[5:10]


def test_order_is_seeded_and_micro_and_rank_slices_tile_the_batch():
    assert epoch_order(30, 0, 1) == epoch_order(30, 0, 1)
    assert epoch_order(30, 0, 1) != epoch_order(30, 0, 2)
    assert epoch_order(30, 1, 1) != epoch_order(30, 0, 1)
    assert sorted(epoch_order(30, 0, 1)) == list(range(30))
    whole = epoch_batches(30, 0, 2, 6)
    micro = epoch_batches(30, 0, 2, 6, micro=2)
    assert [sum(micro[3 * i : 3 * i + 3], []) for i in range(len(whole))] == whole
    ranks = [micro[r::3] for r in range(3)]  # rank r of 3 takes every third micro-batch
    assert [sum((ranks[r][i] for r in range(3)), []) for i in range(len(whole))] == whole
    with pytest.raises(ValueError, match="must divide"):
        epoch_batches(30, 0, 0, 6, micro=4)


def test_steps_per_epoch_refuses_less_than_a_batch():
    assert steps_per_epoch(17, 4, "x") == 4
    with pytest.raises(UserError, match="fewer than one batch of 32: lower it"):
        steps_per_epoch(17, 32, "lower it")


# --------------------------------------------------------------------------- lr schedule


def test_lr_schedule_follows_the_warmup_cosine_formula():
    total, warmup, peak, floor = 50, 8, 0.4, 0.01
    for step in range(total + 1):
        if step < warmup:
            want = peak * step / warmup
        else:
            t = (step - warmup) / (total - warmup)
            want = floor + (peak - floor) * (1 + math.cos(math.pi * t)) / 2
        assert lr_at(step, total, warmup, peak, floor) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lr_at(total + 10, total, warmup, peak, floor) == pytest.approx(floor)  # clamped
    assert lr_at(3, 4, 10, peak, floor) == pytest.approx(peak * 0.3)  # warmup longer than run
    assert lr_at(12, 4, 10, peak, floor) == peak


def test_set_lr_applies_layer_scales():
    w1, w2 = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [w1], "lr_scale": 0.25}, {"params": [w2]}], lr=1.0)
    set_lr(opt, 0.8)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.8]


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_micro_batches_accumulate_the_large_batch_gradient(k):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss_fn = torch.nn.CrossEntropyLoss()
    loss_fn(model(x), y).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    acc = GradAccumulation(k)
    ends = []
    for i, (xb, yb) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
        assert acc.starts(i) == (i == 0)
        acc.backward(loss_fn(model(xb), yb))
        ends.append(acc.ends(i))
    assert ends == [False] * (k - 1) + [True]
    for p, g in zip(model.parameters(), big, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    if k > 1:  # without the 1/k the sum would be k times too large
        assert not torch.allclose(model[0].weight.grad * k, big[0], rtol=1e-3)
    with pytest.raises(ValueError):
        GradAccumulation(0)


def test_split_batch_tiles_the_batch_in_near_equal_parts():
    assert split_batch(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert split_batch(5, 1) == [slice(0, 5)]
    assert split_batch(2, 4) == [slice(0, 1), slice(1, 2)]  # never an empty micro-batch
    assert split_batch(0, 2) == []


# --------------------------------------------------------------------------- resume policy


def test_resumable_checkpoint_round_trip_and_refusal(tmp_path):
    ckpt = ResumableCheckpoint(tmp_path / "c.pth", "aaa", fix="do the fix")
    assert ckpt.load() is None and not ckpt.exists()
    ckpt.save({"step": 3, "w": torch.arange(4)})
    back = ckpt.load()
    assert back is not None and back["step"] == 3 and torch.equal(back["w"], torch.arange(4))
    other = ResumableCheckpoint(tmp_path / "c.pth", "bbb", fix="do the fix")
    with pytest.raises(CheckpointError, match=r"c\.pth was written by a different config.*do the fix"):
        other.load()


def _foreign_checkpoint(path) -> bytes:
    """A checkpoint file some other config wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config_hash": "another-config", "step": 1}, path)
    return path.read_bytes()


def test_pretraining_refuses_a_checkpoint_of_another_config(tiny_imagefolder, tmp_path):
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": "vit_micro_32"},
                         recipe={"name": "mae"}, train={"epochs": 1, "batch_size": 4})
    before = _foreign_checkpoint(tmp_path / "o" / CHECKPOINT)
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT} was written by a different config.*--overwrite"):
        pretrain(cfg, tmp_path / "o", resume=True, log=lambda m: None)
    assert (tmp_path / "o" / CHECKPOINT).read_bytes() == before
    assert not (tmp_path / "o" / "config.yaml").exists()  # refused before the first write


def _ctx(root, out):
    return TaskContext(data=DataConfig(source=str(root)), seed=0, device=torch.device("cpu"),
                       out_dir=out, log=lambda m: None)


@pytest.mark.parametrize(
    ("task", "cfg", "file"),
    [
        ("finetune", FinetuneConfig(epochs=1, batch_size=8, micro_batch_size=4),
         "finetune_checkpoint.pth"),
        ("linear_probe_faithful", LinearProbeFaithfulConfig(epochs=1, batch_size=8,
                                                            micro_batch_size=4),
         "linear_probe_faithful.pth"),
    ],
)  # fmt: skip
def test_training_tasks_refuse_a_checkpoint_of_another_config(tiny_imagefolder, tmp_path, task,
                                                              cfg, file):
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = _foreign_checkpoint(tmp_path / "t" / file)
    with pytest.raises(CheckpointError, match=rf"{file} was written by a different config.*delete it"):
        get_task(task).run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "t"))
    assert (tmp_path / "t" / file).read_bytes() == before  # not silently started over


@pytest.mark.parametrize("recipe", ["mae", "simmim"])
def test_pretraining_accumulation_matches_the_whole_batch(tiny_imagefolder, tmp_path, recipe):
    """Three micro-batches of a step of 8 images (3 + 3 + 2: unequal, weighted by size) give the
    whole batch's gradient, so the run follows the unaccumulated one up to float rounding."""
    rec = {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}} if recipe == "mae" \
        else {"name": "simmim", "masking": {"mask_patch_size": 16}}
    cfg = PretrainConfig(data={"source": str(tiny_imagefolder)}, encoder={"arch": "vit_micro_32"},
                         recipe=rec, train={"epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                                            "base_lr": 1e-3, "max_steps": 3,
                                            "num_recon_images": 0})
    runs = [pretrain(cfg.model_copy(update={"train": cfg.train.model_copy(update={"accum_steps": k})}),
                     tmp_path / f"k{k}", log=lambda m: None) for k in (1, 3)]  # fmt: skip
    whole, accum = (torch.load(r.encoder_path, weights_only=True)["state_dict"] for r in runs)
    curves = [[json.loads(x) for x in (tmp_path / f"k{k}" / "loss.jsonl").read_text().splitlines()]
              for k in (1, 3)]  # fmt: skip
    assert len(curves[0]) == len(curves[1]) == 3
    for a, b in zip(*curves, strict=True):  # the logged loss is the mean over the 8 images
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
    for k, v in whole.items():
        torch.testing.assert_close(accum[k], v, rtol=1e-4, atol=1e-5)


def test_nonfinite_policy_counts_events_in_a_row_and_round_trips():
    from harness.core.training import NonfinitePolicy

    p = NonfinitePolicy("restore", 0.5, max_events=2, keys="train.")
    e = p.event(4, float("nan"), 0.1, None)
    assert e == {"step": 4, "loss": "nan", "lr": 0.1, "action": "restore"}
    p.restored(e, 2)
    assert p.record(e) == "(event 1 in a row, at most 2)" and p.lr_scale == 0.5
    p.stepped(3)  # not past step 4 yet: the streak goes on
    e2 = p.event(4, float("inf"), 0.05, Path("ck.pth"))
    p.restored(e2, 2)
    p.record(e2)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4 after 2 non-finite "
                       r"event\(s\) in a row \(train.nonfinite_max_events=2, policy 'restore'\); "
                       r"the last good checkpoint is ck.pth. Lower train.base_lr"):  # fmt: skip
        p.event(4, float("nan"), 0.025, Path("ck.pth"))
    q = NonfinitePolicy("restore", 0.5, max_events=2)
    q.load_state(p.state())
    assert q.summary() == p.summary() and q.summary()["restores"] == 2 and q.lr_scale == 0.25
    q.stepped(5)  # past the last event: a new streak may start
    q.record(q.event(7, float("nan"), 0.1, None))
    with pytest.raises(FloatingPointError, match=r"^loss is nan at step 0; the last good checkpoint "
                       r"is \(none yet\)\. Lower base_lr, set clip_grad, or set nonfinite"):  # fmt: skip
        NonfinitePolicy("stop", 0.5, 3).event(0, float("nan"), 0.1, None)
