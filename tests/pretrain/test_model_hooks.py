"""The pretraining model's hooks: targets built from the encoder, the after-optimizer-step hook,
no-weight-decay names reported by each part, and a named encoder initialisation."""

from __future__ import annotations

import torch

from harness.core.config import (
    ENCODER_INITS,
    TARGETS,
    EncoderConfig,
    EncoderInitRule,
    PretrainConfig,
    RecipeConfig,
    to_plain,
)
from pretrain.engine import param_groups, pretrain
from pretrain.model import MIMModel
from pretrain.targets import PixelTarget

ENC = EncoderConfig(arch="vit_micro_32")
MAE = {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}}


def test_target_is_built_from_the_encoder(monkeypatch):
    seen = {}

    class SpyTarget(PixelTarget):
        @classmethod
        def from_encoder(cls, cfg, encoder):
            seen["encoder"] = encoder
            return super().from_encoder(cfg, encoder)

    monkeypatch.setitem(TARGETS._items, "pixels", SpyTarget)
    model = MIMModel(ENC, RecipeConfig(name="simmim", masking={"mask_patch_size": 8}))
    assert seen["encoder"] is model.encoder and isinstance(model.target, SpyTarget)
    assert (model.target.patch_size, model.target.grid) == (8, (4, 4))


def test_no_weight_decay_names_come_from_each_part(monkeypatch):
    model = MIMModel(ENC, RecipeConfig(**MAE))
    names = model.no_weight_decay()
    assert {"head.mask_token", "head.decoder_pos_embed"} <= names
    assert {f"encoder.{n}" for n in model.encoder.no_weight_decay()} <= names
    monkeypatch.setattr(type(model.target), "no_weight_decay", lambda self: {"scale"})
    assert "target.scale" in model.no_weight_decay()
    simmim = MIMModel(ENC, RecipeConfig(name="simmim", masking={"mask_patch_size": 8}))
    assert not any(n.startswith("head.") for n in simmim.no_weight_decay())


def test_param_groups_follow_the_reported_names(monkeypatch):
    model = MIMModel(ENC, RecipeConfig(**MAE))
    weight = "head.decoder_embed.weight"
    decay, _ = param_groups(model, 0.05)
    assert any(p is dict(model.named_parameters())[weight] for p in decay["params"])
    monkeypatch.setattr(type(model.head), "no_weight_decay", lambda self: {"decoder_embed.weight"})
    decay, no_decay = param_groups(model, 0.05)
    assert any(p is dict(model.named_parameters())[weight] for p in no_decay["params"])


def test_engine_calls_the_after_step_hook_once_per_optimizer_step(tiny_imagefolder, tmp_path, monkeypatch):
    steps: list[int] = []
    monkeypatch.setattr(MIMModel, "after_step", lambda self, step: steps.append(step))
    cfg = PretrainConfig(
        data={"source": str(tiny_imagefolder)}, encoder={"arch": "vit_micro_32"},
        recipe={"name": "simmim", "masking": {"mask_patch_size": 16}},
        train={"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "lr_base_batch": 4,
               "max_steps": 3, "num_recon_images": 0},
    )
    pretrain(cfg, tmp_path / "o", log=lambda m: None)
    assert steps == [1, 2, 3]


def test_the_after_step_hook_reaches_the_target(monkeypatch):
    calls = []
    model = MIMModel(ENC, RecipeConfig(**MAE))
    monkeypatch.setattr(type(model.target), "after_step",
                        lambda self, encoder, step: calls.append((encoder, step)))
    model.after_step(7)
    assert calls == [(model.encoder, 7)]


def test_a_named_encoder_init_runs_on_the_built_encoder(monkeypatch):
    def zeros(encoder):
        for p in encoder.parameters():
            torch.nn.init.zeros_(p)

    monkeypatch.setitem(ENCODER_INITS._items, "zeros", EncoderInitRule(zeros, None, "test"))
    recipe = RecipeConfig(**MAE, encoder_init="zeros")
    model = MIMModel(ENC, recipe)
    assert all(float(p.detach().abs().sum()) == 0 for p in model.encoder.parameters())
    assert to_plain(recipe)["encoder_init"] == "zeros"  # a non-default init is part of the config
    torch.manual_seed(0)
    a = MIMModel(ENC, RecipeConfig(**MAE, encoder_init="timm")).state_dict()
    torch.manual_seed(0)
    b = MIMModel(ENC, RecipeConfig(**MAE, encoder_init="default")).state_dict()  # the old name
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().sum()) != 0 for k, v in a.items() if k.startswith("encoder."))
