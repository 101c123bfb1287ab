"""Fine-tuning (MAE / BEiT recipe): paper defaults, layer-wise lr decay groups, drop path, the
pooled head, end to end with resume, and Swin through the same layer groups."""

from __future__ import annotations

import pytest
import torch

from downstream.base import TaskContext, get_task
from downstream.finetune import (
    FinetuneConfig,
    FinetuneModel,
    param_groups_layer_decay,
    resolve_settings,
    set_drop_path,
)
from harness.core.config import DataConfig, EncoderConfig
from pretrain.encoders.vit import ViTEncoder

TINY = dict(epochs=2, warmup_epochs=1, batch_size=8, micro_batch_size=4, log_every_steps=1)


def _ctx(root, out, log=None):
    return TaskContext(
        data=DataConfig(source=str(root)),
        seed=0,
        device=torch.device("cpu"),
        out_dir=out,
        log=log or (lambda m: None),
    )


def test_paper_defaults_by_encoder_size():
    cfg = FinetuneConfig()
    assert (cfg.batch_size, cfg.weight_decay, cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob) == (
        1024,
        0.05,
        0.8,
        1.0,
        0.1,
        0.25,
    )
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.warmup_epochs == 5
    base, large = resolve_settings(cfg, 12), resolve_settings(cfg, 24)
    assert (base["epochs"], base["layer_decay"], base["drop_path"], base["base_lr"]) == (
        100,
        0.65,
        0.1,
        5e-4,
    )
    assert (large["epochs"], large["layer_decay"], large["drop_path"], large["base_lr"]) == (
        50,
        0.75,
        0.2,
        1e-3,
    )
    assert resolve_settings(FinetuneConfig(layer_decay=0.9), 12)["layer_decay"] == 0.9


def test_layer_decay_groups_and_no_weight_decay():
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))  # 2 blocks
    model = FinetuneModel(enc, num_classes=3)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["encoder.vit.patch_embed.proj.weight"]["lr_scale"] == 0.5**3
    assert by_name["encoder.vit.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5**2
    assert by_name["encoder.vit.blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert by_name["head.weight"]["lr_scale"] == by_name["fc_norm.weight"]["lr_scale"] == 1.0
    assert by_name["head.weight"]["weight_decay"] == 0.05
    for n in (
        "encoder.vit.cls_token",
        "encoder.vit.blocks.0.attn.qkv.bias",
        "fc_norm.weight",
        "head.bias",
    ):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert "encoder.vit.pos_embed" not in by_name  # frozen sin-cos table (requires_grad False here)


def test_drop_path_rises_linearly():
    enc = ViTEncoder(EncoderConfig(arch="vit_tiny_32"))  # 6 blocks
    set_drop_path(enc, 0.1)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in enc.vit.blocks]
    assert rates == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])


def test_global_pool_reads_tokens_before_the_final_norm():
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32")).eval()
    model = FinetuneModel(enc, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = enc.vit.blocks(enc.vit.norm_pre(enc.embed(x)))
        assert torch.allclose(model.features(x), model.fc_norm(t[:, 1:].mean(1)))
        assert model(x).abs().max() < 1e-2  # head initialized with std 2e-5


def test_finetune_end_to_end_resumes_like_an_uninterrupted_run(tiny_imagefolder, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_step_3(msg):
        if "step 3/" in msg:
            raise Stop

    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = FinetuneConfig(**TINY, ckpt_every_steps=1)
    task = get_task("finetune")
    full = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "a"))
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # a copy was tuned
    assert full.details["resolved"]["steps"] == 6 and full.details["resolved"]["accum"] == 2
    assert 0.0 <= full.metrics["top1"] <= full.metrics["top5"] <= 100.0
    assert not (tmp_path / "a" / "finetune_checkpoint.pth").exists()
    with pytest.raises(Stop):
        task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "b", stop_at_step_3))
    assert (tmp_path / "b" / "finetune_checkpoint.pth").exists()
    logs = []
    resumed = task.run(enc, cfg, _ctx(tiny_imagefolder, tmp_path / "b", logs.append))
    assert any("resumed at step 3/6" in m for m in logs)
    assert resumed.metrics == full.metrics
    assert resumed.details["loss_last"] == pytest.approx(full.details["loss_last"], abs=1e-5)


def test_swin_finetunes_through_its_layer_groups(tiny_imagefolder, tmp_path):
    from pretrain.encoders.swin import SwinEncoder

    torch.manual_seed(0)
    enc = SwinEncoder(EncoderConfig(arch="swin_micro_32"))
    model = FinetuneModel(enc, 3)
    scales = {g["layer_id"]: g["lr_scale"] for g in param_groups_layer_decay(model, 0.05, 0.5)}
    assert scales[0] == 0.5 ** (enc.num_layers + 1) and scales[enc.num_layers + 1] == 1.0
    res = get_task("finetune").run(
        enc, FinetuneConfig(**{**TINY, "max_steps": 1}), _ctx(tiny_imagefolder, tmp_path)
    )
    assert res.details["resolved"]["steps"] == 1


def test_plain_cross_entropy_without_mixup(tiny_imagefolder, tmp_path):
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = FinetuneConfig(
        **{**TINY, "max_steps": 2}, mixup=0, cutmix=0, smoothing=0, auto_augment=None, reprob=0
    )
    res = get_task("finetune").run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    assert res.details["loss_first"] == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=0.05)


def test_beit_encoder_finetunes(tiny_imagefolder, tmp_path):
    from pretrain.encoders.beit import BeitEncoder

    torch.manual_seed(0)
    enc = BeitEncoder(
        EncoderConfig(arch="vit_micro_32"),
        {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False},
    )
    groups = param_groups_layer_decay(FinetuneModel(enc, 3), 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["encoder.beit.rel_pos_bias.relative_position_bias_table"]["layer_id"] == 0
    assert by_name["encoder.beit.rel_pos_bias.relative_position_bias_table"]["weight_decay"] == 0.0
    res = get_task("finetune").run(
        enc, FinetuneConfig(**{**TINY, "max_steps": 1}), _ctx(tiny_imagefolder, tmp_path)
    )
    assert res.details["resolved"]["steps"] == 1


def test_randaugment_posterize_at_full_magnitude_works_with_new_pillow():
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from downstream.finetune import pillow_safe

    tf = pillow_safe(create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1"))
    ops = [op for t in tf.transforms for op in getattr(t, "ops", []) if op.name.startswith("Posterize")]
    assert ops
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(ops[0].aug_fn(img, 0)).max() == 0  # what Pillow < 11 returned for 0 bits
    assert np.asarray(ops[0].aug_fn(img, 8)).max() == 200


def test_finetune_writes_tensorboard_scalars(tiny_imagefolder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    cfg = FinetuneConfig(**{**TINY, "max_steps": 2}, mixup=0, cutmix=0, auto_augment=None, reprob=0)
    res = get_task("finetune").run(enc, cfg, _ctx(tiny_imagefolder, tmp_path))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = acc.Scalars("finetune/loss")
    assert [e.step for e in loss] == [1, 2]
    assert loss[0].value == pytest.approx(res.details["loss_first"], rel=1e-5)
    assert loss[1].value == pytest.approx(res.details["loss_last"], rel=1e-5)
    assert [e.step for e in acc.Scalars("finetune/lr")] == [1, 2]


def test_activation_checkpointing_gives_the_same_fine_tuning(tiny_imagefolder, tmp_path):
    """Recomputed blocks (drop path 0.1 redraws the same masks: the RNG state is replayed) give
    the run without checkpointing; the key is left out of dumps while off."""
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    task = get_task("finetune")
    tiny = {**TINY, "epochs": 1, "drop_path": 0.1, "keep_checkpoint": True}
    runs = {ac: task.run(enc, FinetuneConfig(**tiny, activation_checkpointing=ac),
                         _ctx(tiny_imagefolder, tmp_path / str(ac))) for ac in (False, True)}  # fmt: skip
    assert runs[True].metrics == pytest.approx(runs[False].metrics, abs=1e-9)
    states = [torch.load(tmp_path / str(ac) / "finetune_checkpoint.pth", weights_only=True)["model"]
              for ac in (False, True)]  # fmt: skip
    assert states[0].keys() == states[1].keys()  # the same names: hooks, not wrappers
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=1e-6)
    assert "activation_checkpointing" not in FinetuneConfig(**TINY).model_dump()
    assert FinetuneConfig(**TINY, activation_checkpointing=True).model_dump()["activation_checkpointing"]
