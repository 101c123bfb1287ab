"""Compute settings of pretraining on one process: gradient accumulation (``train.accum_steps``),
``train.compile`` and its eager fallback, and the non-finite loss policy (``train.nonfinite``).

The 2-rank FSDP / DDP checks are in tests/pretrain/test_fsdp.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.core import parallel
from harness.core.config import PretrainConfig, to_plain
from pretrain.engine import lr_at, pretrain
from pretrain.model import MIMModel


def _cfg(data, **train) -> PretrainConfig:
    t = {"epochs": 1, "warmup_epochs": 0.5, "batch_size": 4, "base_lr": 1e-3,
         "lr_base_batch": 4, "ckpt_every_steps": 2, "log_every_steps": 1, "max_steps": 5,
         "num_recon_images": 0, **train}  # fmt: skip
    return PretrainConfig(
        data={"source": str(data)}, encoder={"arch": "vit_micro_32"},
        recipe={"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}}, train=t,
    )  # fmt: skip


def _encoder(result) -> dict[str, torch.Tensor]:
    return torch.load(result.encoder_path, weights_only=True)["state_dict"]


def _loss_curve(out) -> list[dict]:
    return [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------- config


def test_new_train_keys_are_left_out_of_dumps_at_their_defaults(tiny_imagefolder):
    plain = to_plain(_cfg(tiny_imagefolder))["train"]
    assert not set(plain) & {"accum_steps", "compile", "fsdp", "activation_checkpointing",
                             "nonfinite", "nonfinite_lr_factor", "nonfinite_max_events"}
    plain = to_plain(_cfg(tiny_imagefolder, accum_steps=2, nonfinite="skip"))["train"]
    assert plain["accum_steps"] == 2 and plain["nonfinite"] == "skip" and "compile" not in plain


def test_bad_compute_keys_are_refused_naming_the_key(tiny_imagefolder):
    with pytest.raises(ValueError, match="accum_steps=8 is more than batch_size=4"):
        _cfg(tiny_imagefolder, accum_steps=8)
    with pytest.raises(ValueError, match="nonfinite"):
        _cfg(tiny_imagefolder, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite_lr_factor"):
        _cfg(tiny_imagefolder, nonfinite_lr_factor=1.5)


# --------------------------------------------------------------------------- accumulation


def test_accum_steps_equal_the_whole_batch_with_the_lr_schedule_of_optimizer_steps(
    tiny_imagefolder, tmp_path
):
    """4 micro-batches of 2 images per step of 8, during warmup and the cosine: the same weights
    as one batch of 8 (float rounding), and the lr of each step is the schedule's at that
    optimizer step (hand-computed: warmup over 1.5 steps, cosine to step 3)."""
    runs = {k: pretrain(_cfg(tiny_imagefolder, batch_size=8, lr_base_batch=8, accum_steps=k),
                        tmp_path / f"k{k}", log=lambda m: None) for k in (1, 4)}  # fmt: skip
    whole, accum = _encoder(runs[1]), _encoder(runs[4])
    diff = max((whole[k] - accum[k]).abs().max().item() for k in whole)
    print(f"accum_steps 4 vs 1: max abs weight diff {diff:.3g}")
    for k, v in whole.items():
        torch.testing.assert_close(accum[k], v, rtol=1e-4, atol=1e-5)
    a, b = _loss_curve(tmp_path / "k1"), _loss_curve(tmp_path / "k4")
    # 24 images / 8 = 3 steps; warmup 0.5 epoch = 1.5 steps; peak 1e-3 * 8 / 8
    expect = [0.0, 1e-3 / 1.5, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5 / 1.5))]
    assert [h["lr"] for h in a] == [h["lr"] for h in b] == pytest.approx(expect, rel=1e-12)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert _summary(tmp_path / "k4")["compute"]["accum_steps"] == 4


# --------------------------------------------------------------------------- compile


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler on this machine (simulated)")


def test_a_failing_compile_falls_back_to_eager_with_one_warning(
    tiny_imagefolder, tmp_path, monkeypatch
):
    eager = pretrain(_cfg(tiny_imagefolder, max_steps=3), tmp_path / "eager", log=lambda m: None)
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", _failing_backend)
    lines: list[str] = []
    res = pretrain(_cfg(tiny_imagefolder, max_steps=3, compile=True), tmp_path / "c", log=lines.append)
    warnings = [x for x in lines if "WARNING" in x]
    assert len(warnings) == 1, lines
    assert "torch.compile failed" in warnings[0] and "no C++ compiler" in warnings[0]
    assert "continuing eagerly" in warnings[0]
    compute = _summary(tmp_path / "c")["compute"]
    assert compute["compile"] and not compute["compiled"]
    assert "no C++ compiler" in compute["compile_error"]
    # the failed attempt changed nothing: the eager run's weights, bit for bit
    a, b = _encoder(eager), _encoder(res)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_one(tiny_imagefolder, tmp_path, monkeypatch):
    """Dynamo's graphs through AOTAutograd (the ``aot_eager`` backend: inductor's path without
    its C++ code generation, which takes minutes here) give the eager weights."""
    eager = pretrain(_cfg(tiny_imagefolder, max_steps=3), tmp_path / "eager", log=lambda m: None)
    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")
    res = pretrain(_cfg(tiny_imagefolder, max_steps=3, compile=True), tmp_path / "c",
                   log=lambda m: None)  # fmt: skip
    compute = _summary(tmp_path / "c")["compute"]
    assert compute["compiled"] and compute["compile_error"] is None
    a, b = _encoder(eager), _encoder(res)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- non-finite losses


def _poison(monkeypatch, at_calls: set[int], snapshots: dict[int, dict[str, torch.Tensor]]):
    """Make the loss NaN on the forward calls numbered in ``at_calls`` (1-based; one forward per
    step here), and record the encoder weights each forward sees."""
    original = MIMModel.forward
    calls = {"n": 0}

    def forward(self, imgs, mask, local=None):
        calls["n"] += 1
        snapshots[calls["n"]] = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        out = original(self, imgs, mask, local)
        if calls["n"] in at_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MIMModel, "forward", forward)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_stop_raises_naming_the_step(tiny_imagefolder, tmp_path, monkeypatch):
    _poison(monkeypatch, {3}, {})
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2.*nonfinite: skip / restore"):
        pretrain(_cfg(tiny_imagefolder), tmp_path / "o", log=lambda m: None)


def test_nonfinite_skip_makes_no_update_and_counts_the_step(tiny_imagefolder, tmp_path, monkeypatch):
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    _poison(monkeypatch, {3}, snaps)
    lines: list[str] = []
    res = pretrain(_cfg(tiny_imagefolder, nonfinite="skip"), tmp_path / "o", log=lines.append)
    assert res.steps == 5
    assert _same(snaps[3], snaps[4])  # the skipped step left the weights as they were
    assert not _same(snaps[2], snaps[3]) and not _same(snaps[4], snaps[5])  # the others moved
    assert [h["step"] for h in _loss_curve(tmp_path / "o")] == [1, 2, 4, 5]
    nf = _summary(tmp_path / "o")["nonfinite"]
    assert nf["policy"] == "skip" and nf["skipped_steps"] == 1 and nf["restores"] == 0
    assert [(e["step"], e["loss"], e["action"]) for e in nf["events"]] == [(2, "nan", "skip")]
    assert any("step 2: loss is nan; step skipped" in x for x in lines)


def test_nonfinite_skip_gives_up_after_the_limit_in_a_row(tiny_imagefolder, tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 3, 4}, {})
    cfg = _cfg(tiny_imagefolder, nonfinite="skip", nonfinite_max_events=2)
    with pytest.raises(FloatingPointError, match=r"at step 3 after 2 non-finite event\(s\) in a row "
                                                 r"\(train.nonfinite_max_events=2"):
        pretrain(cfg, tmp_path / "o", log=lambda m: None)


def test_nonfinite_restore_reloads_the_checkpoint_and_scales_the_lr(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """NaN at the 4th step: the step-2 checkpoint comes back (the weights the 3rd step saw), the
    lr is halved from there on, and the run finishes its 5 steps."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    _poison(monkeypatch, {4}, snaps)
    lines: list[str] = []
    cfg = _cfg(tiny_imagefolder, nonfinite="restore", nonfinite_lr_factor=0.5)
    res = pretrain(cfg, tmp_path / "o", log=lines.append)
    assert res.steps == 5 and len(snaps) == 5 + 2  # steps 3 and 4 ran twice
    assert _same(snaps[5], snaps[3])  # the first forward after the restore: step 2's weights
    curve = _loss_curve(tmp_path / "o")
    assert [h["step"] for h in curve] == [1, 2, 3, 4, 5]
    # 24 images / batch 4 = 6 steps a epoch, 5 run; warmup 3 steps; peak 1e-3
    sched = [lr_at(s, 5, 3.0, 1e-3, 0.0) for s in range(5)]
    assert [h["lr"] for h in curve] == pytest.approx(
        sched[:2] + [0.5 * x for x in sched[2:]], rel=1e-12
    )
    nf = _summary(tmp_path / "o")["nonfinite"]
    assert nf["restores"] == 1 and nf["lr_scale"] == 0.5
    (event,) = nf["events"]
    assert (event["step"], event["action"], event["restored_step"]) == (3, "restore", 2)
    assert any("step 3: loss is nan; restored step 2" in x for x in lines)
    ck = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert ck["lr_scale"] == 0.5 and len(ck["nonfinite_events"]) == 1  # a resume keeps them


def test_nonfinite_restore_before_any_checkpoint_goes_back_to_the_start(
    tiny_imagefolder, tmp_path, monkeypatch
):
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    _poison(monkeypatch, {1}, snaps)
    res = pretrain(_cfg(tiny_imagefolder, nonfinite="restore"), tmp_path / "o", log=lambda m: None)
    assert res.steps == 5 and _same(snaps[1], snaps[2])
    (event,) = _summary(tmp_path / "o")["nonfinite"]["events"]
    assert event["step"] == 0 and event["restored_step"] == 0
