"""Fine-tuning's non-finite loss policy (``nonfinite``: stop | skip | restore, the pretraining's
:class:`harness.core.training.NonfinitePolicy`), with a loss made non-finite on chosen
micro-batches."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from downstream.base import TaskContext, get_task
from downstream.finetune import FinetuneConfig
from harness.core.config import DataConfig, EncoderConfig
from harness.core.training import lr_at, scaled_lr
from pretrain.encoders.vit import ViTEncoder

#: 24 train images, batch 8 in 2 micro-batches of 4: 3 steps per epoch, 6 in all; micro-batch
#: ``j`` of step ``s`` is the criterion's call ``2 s + j`` in a fresh single-process run.
TINY = dict(epochs=2, warmup_epochs=1, batch_size=8, micro_batch_size=4, log_every_steps=1,
            keep_checkpoint=True)  # fmt: skip


@contextlib.contextmanager
def nonfinite_at(calls: set[int], value: float = math.nan) -> Iterator[None]:
    """Within the block, fine-tuning's loss is multiplied by ``value`` on the criterion's calls
    ``calls`` (counted from 0 in each run, on this process)."""
    import downstream.finetune as finetune

    original = finetune._mixer_and_criterion

    def poisoned(cfg, num_classes):  # type: ignore[no-untyped-def]
        mixer, criterion = original(cfg, num_classes)
        count = itertools.count()

        class Poisoned(nn.Module):
            def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                loss = criterion(out, y)
                return loss * value if next(count) in calls else loss

        return mixer, Poisoned()

    finetune._mixer_and_criterion = poisoned
    try:
        yield
    finally:
        finetune._mixer_and_criterion = original


def _run(root, out, log=None, **keys):
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    ctx = TaskContext(data=DataConfig(source=str(root)), seed=0, device=torch.device("cpu"),
                      out_dir=out, log=log or (lambda m: None))  # fmt: skip
    return get_task("finetune").run(enc, FinetuneConfig(**TINY, **keys), ctx)


def _history(out) -> list[dict]:
    return torch.load(out / "finetune_checkpoint.pth", weights_only=True)["history"]


def test_new_keys_stay_out_of_dumps_at_their_defaults():
    plain = FinetuneConfig().model_dump(mode="json")
    assert not {"fsdp", "nonfinite", "nonfinite_lr_factor", "nonfinite_max_events"} & set(plain)
    dumped = FinetuneConfig(nonfinite="skip", fsdp=True).model_dump(mode="json")
    assert dumped["nonfinite"] == "skip" and dumped["fsdp"] is True
    with pytest.raises(ValueError, match="nonfinite"):
        FinetuneConfig(nonfinite="ignore")


def test_stop_raises_naming_the_step(tiny_imagefolder, tmp_path):
    with nonfinite_at({4}), pytest.raises(
        FloatingPointError, match=r"loss is nan at step 2; .*Lower base_lr, set clip_grad, or set "
        r"nonfinite: skip / restore"
    ):  # fmt: skip
        _run(tiny_imagefolder, tmp_path / "o")


def test_skip_makes_no_update_and_is_recorded(tiny_imagefolder, tmp_path):
    lines: list[str] = []
    with nonfinite_at({5}, math.inf):  # the second micro-batch of step 2
        res = _run(tiny_imagefolder, tmp_path / "o", lines.append, nonfinite="skip")
    nf = res.details["nonfinite"]
    assert nf["policy"] == "skip" and nf["skipped_steps"] == 1 and nf["restores"] == 0
    assert [(e["step"], e["loss"], e["action"]) for e in nf["events"]] == [(2, "inf", "skip")]
    assert any("step 2: loss is inf; step skipped (no update) (event 1 in a row" in x for x in lines)
    assert res.details["resolved"]["steps"] == 6
    assert [h["step"] for h in _history(tmp_path / "o")] == [1, 2, 4, 5, 6]  # step 2 made none
    assert math.isfinite(res.details["loss_last"])


def test_skip_gives_up_after_the_limit_in_a_row(tiny_imagefolder, tmp_path):
    with nonfinite_at(set(range(100))), pytest.raises(
        FloatingPointError, match=r"loss is nan at step 2 after 2 non-finite event\(s\) in a row "
        r"\(nonfinite_max_events=2, policy 'skip'\)"
    ):  # fmt: skip
        _run(tiny_imagefolder, tmp_path / "o", nonfinite="skip", nonfinite_max_events=2)


def test_restore_reloads_the_checkpoint_and_lowers_the_lr(tiny_imagefolder, tmp_path):
    lines: list[str] = []
    with nonfinite_at({7}):  # step 3 (after step 2's checkpoint), its second micro-batch
        res = _run(tiny_imagefolder, tmp_path / "o", lines.append, nonfinite="restore",
                   ckpt_every_steps=2, nonfinite_lr_factor=0.25)  # fmt: skip
    nf = res.details["nonfinite"]
    assert nf["restores"] == 1 and nf["lr_scale"] == 0.25
    assert [(e["step"], e["restored_step"]) for e in nf["events"]] == [(3, 2)]
    assert any("step 3: loss is nan; restored step 2 from" in x for x in lines)
    hist = _history(tmp_path / "o")
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]  # steps 3-6 redone once each
    peak = scaled_lr(5e-4, 8)  # vit_micro_32 has 2 blocks: ViT-B's base lr
    for h in hist:  # the lr schedule from the restored step on, times 0.25
        scale = 1.0 if h["step"] <= 2 else 0.25
        assert h["lr"] == pytest.approx(scale * lr_at(h["step"] - 1, 6, 3, peak, 1e-6))
    assert res.details["resolved"]["steps"] == 6


def test_restore_before_any_checkpoint_restores_the_start(tiny_imagefolder, tmp_path):
    with nonfinite_at({0}):
        res = _run(tiny_imagefolder, tmp_path / "o", nonfinite="restore")
    (event,) = res.details["nonfinite"]["events"]
    assert (event["step"], event["restored_step"], event["lr_scale"]) == (0, 0, 0.5)
    assert res.details["resolved"]["steps"] == 6
