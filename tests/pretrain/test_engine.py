"""The pretraining engine: schedule, parameter groups, resume, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harness.core.config import PretrainConfig
from pretrain.engine import ENCODER, lr_at, param_groups, pretrain
from pretrain.model import MIMModel


def _cfg(data, recipe="simmim", **train):
    t = {"epochs": 2, "warmup_epochs": 1, "batch_size": 4, "base_lr": 1e-3, "lr_base_batch": 4,
         "ckpt_every_steps": 3, "log_every_steps": 1, "num_recon_images": 3, **train}
    rec = {"name": recipe}
    if recipe == "simmim":
        rec["masking"] = {"mask_patch_size": 16}
    else:
        rec["head"] = {"depth": 1, "dim": 32, "num_heads": 2}
    return PretrainConfig(data={"source": str(data)}, encoder={"arch": "vit_micro_32"}, recipe=rec, train=t)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert math.isclose(lr_at(5, 100, 10, 1.0, 0.0), 0.5)
    assert math.isclose(lr_at(10, 100, 10, 1.0, 0.0), 1.0)
    assert math.isclose(lr_at(55, 100, 10, 1.0, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(100, 100, 10, 1.0, 0.1), 0.1)


def test_no_weight_decay_on_biases_norms_embeddings_tokens():
    from harness.core.config import EncoderConfig, RecipeConfig

    model = MIMModel(EncoderConfig(arch="vit_micro_32"), RecipeConfig(name="mae", head={"depth": 1, "dim": 32, "num_heads": 2}))
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    names_no = {n for n, p in model.named_parameters() if id(p) in ids}
    assert "encoder.vit.cls_token" in names_no and "encoder.mask_token" in names_no
    assert "head.mask_token" in names_no and "encoder.vit.blocks.0.norm1.weight" in names_no
    assert "encoder.vit.blocks.0.attn.qkv.bias" in names_no
    assert "encoder.vit.blocks.0.attn.qkv.weight" not in names_no
    # fixed sin-cos embeddings are not trained at all
    assert "encoder.vit.pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("recipe", ["simmim", "mae"])
def test_resume_reproduces_the_uninterrupted_run(tiny_imagefolder, tmp_path, recipe):
    cfg = _cfg(tiny_imagefolder, recipe)
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)
    assert full.steps == 12  # 24 train images / batch 4 * 2 epochs

    class Interrupt(Exception):
        pass

    def killer(msg: str) -> None:
        if "step 8/" in msg:  # after the step-6 checkpoint, before the step-9 one
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "cut", log=killer)
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 6
    lines = []
    resumed = pretrain(cfg, tmp_path / "cut", resume=True, log=lines.append)
    assert any("resumed at step 6" in m for m in lines)
    a = [json.loads(x) for x in (tmp_path / "full" / "loss.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "cut" / "loss.jsonl").read_text().splitlines()]
    assert a == b  # the same loss curve, bitwise, on CPU
    sa = torch.load(full.encoder_path, weights_only=True)["state_dict"]
    sb = torch.load(resumed.encoder_path, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_outputs_and_loss_goes_down_on_a_fixed_batch(tiny_imagefolder, tmp_path):
    cfg = _cfg(tiny_imagefolder, "mae", epochs=1)
    res = pretrain(cfg, tmp_path / "o", log=lambda m: None)
    assert (tmp_path / "o" / ENCODER).is_file() and res.recon_path.is_file()
    from PIL import Image

    im = Image.open(res.recon_path)
    assert im.width > 3 * 32 and im.height > 4 * 32  # 4 rows of 3 images, upscaled
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 6
    # the masking's AvgDist (SimMIM Fig. 3), as pretrain.avgdist computes it for the config
    from pretrain.avgdist import encoder_avgdist

    assert summary["avgdist"] == encoder_avgdist(cfg.recipe.masking, cfg.encoder).to_dict()
    # TensorBoard scalars: the loss curve of loss.jsonl, step for step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "o" / "tb"))
    acc.Reload()
    curve = [json.loads(line) for line in (tmp_path / "o" / "loss.jsonl").read_text().splitlines()]
    tb = acc.Scalars("pretrain/loss")
    assert [e.step for e in tb] == [h["step"] for h in curve] == list(range(1, 7))
    assert [e.value for e in tb] == pytest.approx([h["loss"] for h in curve], rel=1e-6)
    # the same model optimized on one fixed batch drives the loss down
    from harness.core.config import EncoderConfig, RecipeConfig

    for name in ("simmim", "mae"):
        torch.manual_seed(0)
        rec = RecipeConfig(name=name, masking={"mask_patch_size": 16} if name == "simmim" else {},
                           head={"depth": 1, "dim": 32, "num_heads": 2})
        model = MIMModel(EncoderConfig(arch="vit_micro_32"), rec)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4), size=32, mode="bilinear")
        mask = model.masker(4, generator=torch.Generator().manual_seed(0))
        first = None
        for _ in range(40):
            loss = model(x, mask).loss
            first = first if first is not None else loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.7 * first, name


def test_resume_refuses_a_different_config(tiny_imagefolder, tmp_path):
    from harness.core.errors import CheckpointError

    pretrain(_cfg(tiny_imagefolder, max_steps=3), tmp_path / "o", log=lambda m: None)
    with pytest.raises(CheckpointError, match="different config"):
        pretrain(_cfg(tiny_imagefolder, max_steps=3, base_lr=5e-3), tmp_path / "o", log=lambda m: None)


def test_missing_dataset_and_tiny_dataset_errors(tmp_path, tiny_imagefolder):
    from harness.core.config import ConfigError
    from harness.core.data.datasets import DatasetError

    with pytest.raises(DatasetError, match="does not exist"):
        pretrain(_cfg(tmp_path / "nowhere"), tmp_path / "o", log=lambda m: None)
    with pytest.raises(ConfigError, match="lower train.batch_size"):
        pretrain(_cfg(tiny_imagefolder, batch_size=64), tmp_path / "o2", log=lambda m: None)


def test_nan_loss_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint(
    tiny_imagefolder, tmp_path, monkeypatch
):
    calls = {"n": 0}
    original = MIMModel.forward

    def flaky(self, imgs, mask, local=None):
        out = original(self, imgs, mask, local)
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th training step diverges
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MIMModel, "forward", flaky)
    cfg = _cfg(tiny_imagefolder, "mae", ckpt_every_steps=2)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4.*checkpoint.pth"):
        pretrain(cfg, tmp_path / "o", log=lambda m: None)
    ck = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)
    assert ck["step"] == 4 and all(math.isfinite(h["loss"]) for h in ck["history"])
    assert not (tmp_path / "o" / ENCODER).exists()


def _files(root):
    """Every file under ``root`` with its bytes."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_pretrain_leaves_the_directory_as_it_was(tiny_imagefolder, tmp_path, capsys):
    import yaml

    from harness.cli import main

    raw = {"kind": "pretrain", "name": "r", "data": {"source": str(tiny_imagefolder)},
           "encoder": {"arch": "vit_micro_32"},
           "recipe": {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}},
           "train": {"epochs": 1, "batch_size": 4, "max_steps": 2, "num_recon_images": 0}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "o"
    assert main(["pretrain", str(path), "--out", str(out)]) == 0
    before = _files(out)
    assert b"base_lr: 0.00015" in before[Path("config.yaml")]
    capsys.readouterr()
    # --resume with another config: refused, and config.yaml still matches the checkpoint
    assert main(["pretrain", str(path), "--out", str(out), "--resume",
                 "--set", "train.base_lr=5e-3"]) == 2
    assert "different config" in capsys.readouterr().err
    assert _files(out) == before
    # --overwrite whose data is missing: refused before anything is replaced
    nowhere = f"data.source={tmp_path / 'nowhere'}"
    assert main(["pretrain", str(path), "--out", str(out), "--overwrite", "--set", nowhere]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _files(out) == before
    # a refused fresh run leaves no directory behind
    assert main(["pretrain", str(path), "--out", str(tmp_path / "new"), "--set", nowhere]) == 2
    assert not (tmp_path / "new").exists()
    # the unchanged config still resumes (nothing to do: it finished)
    assert main(["pretrain", str(path), "--out", str(out), "--resume"]) == 0
    assert (out / "config.yaml").read_bytes() == before[Path("config.yaml")]
