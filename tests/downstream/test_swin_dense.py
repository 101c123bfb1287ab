"""Swin encoders in the dense tasks: mmdet's / mmseg's own Swin with our timm-keyed weights
mapped in. The mapped backbones must reproduce, stage by stage, the features that timm's model
computes; a wrong patch-merge channel order must show. Then both tasks end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downstream._mm.swin_dense import (
    merge_order_timm_to_mm,
    mm_swin_kwargs,
    resize_bias_table,
    timm_to_mm_swin,
)
from harness.core.config import ENCODER_PRESETS, ConfigError, DataConfig, EncoderConfig
from harness.core.data.shapes import ShapesSpec, ensure_shapes
from harness.core.errors import CheckpointError

# 4 stages of 2 blocks (a shifted block in each), window 2 < every stage's grid at 128 px
# (32, 16, 8, 4), so neither timm nor OpenMMLab shrinks, pads or unshifts a window
TEST_SWIN = dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=128,
                 patch_size=4, embed_dim=32, depth=8, num_heads=1, mlp_ratio=2.0,
                 stage_depths=(2, 2, 2, 2), stage_heads=(1, 2, 4, 8), window_size=2)  # fmt: skip
SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=96,
                  train_scenes=16, val_scenes=4, seed=0)  # fmt: skip


@pytest.fixture
def test_swin(monkeypatch: pytest.MonkeyPatch) -> EncoderConfig:
    monkeypatch.setitem(ENCODER_PRESETS, "swin_test_128", TEST_SWIN)
    return EncoderConfig(arch="swin_test_128")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(SPEC, cache_root=tmp_path_factory.getbasetemp() / "shapes-cache")


def _randomized_swin(cfg: EncoderConfig, seed: int = 0) -> torch.nn.Module:
    """A Swin encoder whose every parameter (norms and bias tables included) is random, so that
    a misplaced or mis-ordered tensor cannot go unnoticed."""
    from pretrain.encoders.swin import SwinEncoder

    torch.manual_seed(seed)
    enc = SwinEncoder(cfg).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if "relative_position" in name else 0.1))
    return enc


def _timm_stage_features(enc: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's last block output through timm's own modules, ``[B, C_i, H_i, W_i]``, with
    timm's final norm on the last stage and a plain (identity-affine) LayerNorm on the others
    (OpenMMLab's new output norms start as identity-affine)."""
    t = enc.swin.patch_embed(x)  # [B, H/4, W/4, C]
    outs = []
    for i, stage in enumerate(enc.swin.layers):
        t = stage(t)
        last = i == len(enc.swin.layers) - 1
        y = enc.swin.norm(t) if last else F.layer_norm(t, t.shape[-1:])
        outs.append(y.permute(0, 3, 1, 2))
    return outs


# --------------------------------------------------------------------------- torch only


def test_merge_order_matches_unfold():
    """timm's 2 x 2 concatenation reordered equals OpenMMLab's ``nn.Unfold`` sampling."""
    from timm.models.swin_transformer import PatchMerging

    torch.manual_seed(0)
    b, h, w, c = 2, 6, 4, 5
    x = torch.randn(b, h, w, c)
    timm_merge = PatchMerging(c)
    captured = {}
    timm_merge.norm.register_forward_hook(lambda m, inp, out: captured.setdefault("cat", inp[0]))
    timm_merge(x)
    timm_cat = captured["cat"]  # [B, H/2, W/2, 4C] in timm's order
    unfold = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # [B, 4C, L], mm's order
    mm_cat = unfold.transpose(1, 2).reshape(b, h // 2, w // 2, 4 * c)
    assert not torch.allclose(timm_cat, mm_cat)  # the orders do differ
    assert torch.equal(merge_order_timm_to_mm(timm_cat, dim=-1), mm_cat)
    # a reduction weight permuted the same way gives the same projection
    weight = torch.randn(2 * c, 4 * c)
    assert torch.allclose(timm_cat @ weight.t(), mm_cat @ merge_order_timm_to_mm(weight, -1).t(),
                          atol=1e-5)  # fmt: skip


def test_bias_table_resize():
    table = torch.full((9, 2), 3.0)  # window 2, 2 heads
    big = resize_bias_table(table, 4)
    assert big.shape == (49, 2) and torch.allclose(big, torch.full((49, 2), 3.0), atol=1e-5)
    t = torch.randn(49, 3)
    assert resize_bias_table(t, 4) is t  # same window: untouched


def test_architecture_of_the_mm_swin(test_swin):
    kw = mm_swin_kwargs(test_swin, drop_path_rate=0.2)
    assert kw["depths"] == [2, 2, 2, 2] and kw["num_heads"] == [1, 2, 4, 8]
    assert kw["embed_dims"] == 32 and kw["window_size"] == 2 and kw["patch_size"] == 4
    assert kw["strides"] == [4, 2, 2, 2] and kw["out_indices"] == [0, 1, 2, 3]
    assert kw["mlp_ratio"] == 2 and isinstance(kw["mlp_ratio"], int)
    with pytest.raises(ConfigError, match="not a Swin"):
        mm_swin_kwargs(EncoderConfig(arch="vit_micro_32"), 0.1)


def test_mapping_rejects_keys_of_other_models(test_swin):
    state = _randomized_swin(test_swin).timm_state_dict()
    mapped = timm_to_mm_swin(state, 4, 2)
    assert "stages.0.downsample.reduction.weight" in mapped  # timm's layers.1.downsample
    assert "stages.3.blocks.1.ffn.layers.1.weight" in mapped
    assert "norm3.weight" in mapped and not any("relative_position_index" in k for k in mapped)
    with pytest.raises(CheckpointError, match=r"head\.fc\.weight"):
        timm_to_mm_swin({**state, "head.fc.weight": torch.zeros(3, 256)}, 4, 2)


def test_inverse_mapping_restores_timm_weights(test_swin):
    """OpenMMLab -> timm (mmpretrain import) undoes timm -> OpenMMLab exactly."""
    from downstream.swin_keys import merge_order_mm_to_timm, mm_to_timm_swin

    x = torch.randn(4 * 3, 4 * 5)
    assert torch.equal(merge_order_mm_to_timm(merge_order_timm_to_mm(x, -1), -1), x)
    assert torch.equal(merge_order_timm_to_mm(merge_order_mm_to_timm(x, 0), 0), x)
    state = _randomized_swin(test_swin).timm_state_dict()
    mm = timm_to_mm_swin(state, 4, 2)
    back, dropped, unknown = mm_to_timm_swin({**mm, "norm1.weight": torch.ones(64), "x.y": x})
    kept = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    assert sorted(back) == sorted(kept) and all(torch.equal(back[k], v) for k, v in kept.items())
    assert dropped == {"output norm of an earlier stage (timm's Swin has none)": ["norm1.weight"]}
    assert unknown == ["x.y"]


# --------------------------------------------------------------------------- mm backbones


def _build(lib: str, kwargs: dict, init: str | None) -> torch.nn.Module:
    if lib == "mmdet":
        from downstream._mm.mmdet_modules import MimSwin
    else:
        from downstream._mm.mmseg_modules import MimSwin  # type: ignore[assignment]
    return MimSwin(init_checkpoint=init, **kwargs)


@pytest.mark.mm
@pytest.mark.parametrize("lib", ["mmdet", "mmseg"])
def test_mm_swin_reproduces_timm_stage_features(lib, test_swin, tmp_path):
    enc = _randomized_swin(test_swin)
    enc.save_timm(tmp_path / "enc.pth")
    model = _build(lib, mm_swin_kwargs(test_swin, 0.0), str(tmp_path / "enc.pth"))
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got, ref = model(x), _timm_stage_features(enc, x)
    assert [tuple(g.shape) for g in got] == [(2, 32, 32, 32), (2, 64, 16, 16), (2, 128, 8, 8),
                                             (2, 256, 4, 4)]  # fmt: skip
    diffs = [float((g - r).abs().max()) for g, r in zip(got, ref, strict=True)]
    print(f"{lib} Swin vs timm, max abs diff per stage: {diffs}")
    assert max(diffs) < 1e-4, diffs
    assert all(float(r.abs().mean()) > 0.1 for r in ref)  # not trivially small features

    # the same weights with timm's merge order left as it is: stages after the first differ
    state = timm_to_mm_swin(enc.timm_state_dict(), 4, 2)
    key = "stages.0.downsample.reduction.weight"
    state[key] = enc.swin.layers[1].downsample.reduction.weight.detach().clone()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        wrong = model(x)
    assert torch.allclose(wrong[0], ref[0], atol=1e-4)
    assert float((wrong[1] - ref[1]).abs().max()) > 1e-2


@pytest.mark.mm
def test_mm_swin_rejects_weights_of_another_architecture(test_swin, tmp_path):
    from pretrain.encoders.swin import SwinEncoder

    SwinEncoder(EncoderConfig(arch="swin_micro_32")).save_timm(tmp_path / "micro.pth")
    model = _build("mmdet", mm_swin_kwargs(test_swin, 0.0), str(tmp_path / "micro.pth"))
    with pytest.raises(CheckpointError, match="do not fit the Swin backbone"):
        model.init_weights()


@pytest.mark.mm
def test_small_pretraining_window_is_resized(tmp_path):
    """swin_micro_32 pretrains at 32 px: timm shrinks the last stage's window to its 2 x 2 grid
    (a 3 x 3 bias table); mmdet keeps window 4 and gets the table resized."""
    from pretrain.encoders.swin import SwinEncoder

    cfg = EncoderConfig(arch="swin_micro_32")
    enc = SwinEncoder(cfg)
    assert enc.swin.layers[2].blocks[0].attn.relative_position_bias_table.shape[0] == 9
    enc.save_timm(tmp_path / "micro.pth")
    model = _build("mmdet", mm_swin_kwargs(cfg, 0.0), str(tmp_path / "micro.pth"))
    model.init_weights()
    table = model.stages[2].blocks[0].attn.w_msa.relative_position_bias_table
    assert table.shape == (49, 4)
    got = model.stages[0].blocks[0].attn.w_msa.qkv.weight
    assert torch.equal(got, enc.swin.layers[0].blocks[0].attn.qkv.weight)


@pytest.mark.mm
def test_swin_layer_decay_groups(test_swin):
    from downstream._mm.common import LayerDecayOptimWrapperConstructor

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = _build("mmdet", mm_swin_kwargs(test_swin, 0.0), None)
            self.head = torch.nn.Linear(4, 3)

    model = Model()
    bb = model.backbone
    assert bb.num_layers == 8
    assert bb.layer_id("patch_embed.projection.weight") == 0
    assert bb.layer_id("stages.0.blocks.1.attn.w_msa.qkv.weight") == 2
    assert bb.layer_id("stages.0.downsample.reduction.weight") == 3  # joins stage 1's first block
    assert bb.layer_id("stages.1.blocks.0.norm1.weight") == 3
    assert bb.layer_id("stages.3.blocks.1.ffn.layers.1.weight") == 8
    assert bb.layer_id("norm2.weight") == 9
    ctor = LayerDecayOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay_rate=0.5),
    )
    groups = ctor(model).optimizer.param_groups
    where = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def lr_wd(name: str) -> tuple[float, float]:
        g = where[id(named[name])]
        return g["lr"], g["weight_decay"]

    assert lr_wd("backbone.patch_embed.projection.weight") == (0.5**9, 0.05)
    assert lr_wd("backbone.stages.2.blocks.0.attn.w_msa.qkv.weight") == (0.5**4, 0.05)
    table = "backbone.stages.2.blocks.0.attn.w_msa.relative_position_bias_table"
    assert lr_wd(table) == (0.5**4, 0.0)  # no weight decay on the bias tables
    assert lr_wd("backbone.norm0.weight") == (1.0, 0.0)
    assert lr_wd("head.weight") == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(named)


# --------------------------------------------------------------------------- end to end


def _ctx(shapes_root: Path, out: Path):
    from downstream.base import TaskContext

    return TaskContext(data=DataConfig(source=str(shapes_root)), seed=0,
                       device=torch.device("cpu"), out_dir=out, log=lambda m: None)  # fmt: skip


@pytest.mark.mm
@pytest.mark.slow
def test_swin_detection_end_to_end(shapes_root, tmp_path):
    from mmengine.config import Config

    from downstream.base import get_task
    from downstream.detection import DetectionConfig
    from pretrain.encoders.swin import SwinEncoder

    torch.manual_seed(0)
    enc = SwinEncoder(EncoderConfig(arch="swin_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = DetectionConfig(img_size=64, fpn_channels=16, roi_fc_channels=32, batch_size=2,
                          max_iters=3, warmup_iters=1, lr=1e-4, lr_base_batch=None, score_thr=0.0,
                          checkpoint_interval=1000, log_level="WARNING")  # fmt: skip
    task = get_task("detection")
    res = task.run(enc, cfg, _ctx(shapes_root, tmp_path / "det"))
    assert set(res.metrics) == {"box_ap", "mask_ap"}
    assert all(0.0 <= v <= 100.0 for v in res.metrics.values())
    assert not res.details["empty_predictions"]  # COCOeval ran on real detections
    assert res.details["iters_run"] == 3 and np.isfinite(res.details["losses"]).all()
    mm = Config.fromfile(res.details["mm_config"])
    assert mm.model.backbone.type == "MimSwin" and mm.model.backbone.depths == [1, 1, 1]
    assert mm.model.neck.type == "FPN" and mm.model.neck.in_channels == [16, 32, 64]
    assert mm.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.9  # swin_layer_decay
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


@pytest.mark.mm
@pytest.mark.slow
def test_swin_segmentation_end_to_end(shapes_root, tmp_path):
    from mmengine.config import Config

    from downstream.base import get_task
    from downstream.segmentation import SegmentationConfig
    from pretrain.encoders.swin import SwinEncoder

    torch.manual_seed(0)
    enc = SwinEncoder(EncoderConfig(arch="swin_micro_32"))
    cfg = SegmentationConfig(crop_size=64, decode_channels=16, aux_channels=8, batch_size=2,
                             max_iters=3, warmup_iters=1, lr=1e-4, lr_base_batch=None,
                             checkpoint_interval=1000, log_level="WARNING")  # fmt: skip
    res = get_task("segmentation").run(enc, cfg, _ctx(shapes_root, tmp_path / "seg"))
    assert set(res.metrics) == {"miou"} and 0.0 <= res.metrics["miou"] <= 100.0
    assert res.details["iters_run"] == 3 and np.isfinite(res.details["losses"]).all()
    mm = Config.fromfile(res.details["mm_config"])
    assert mm.model.backbone.type == "MimSwin" and "neck" not in mm.model
    assert mm.model.decode_head.in_channels == [16, 32, 64]
    assert mm.model.auxiliary_head.in_index == 1 and mm.model.auxiliary_head.in_channels == 32
    with pytest.raises(ConfigError, match="remove out_indices"):
        get_task("segmentation").run(enc, cfg.model_copy(update={"out_indices": [0, 1, 2, 3]}),
                                     _ctx(shapes_root, tmp_path / "seg2"))  # fmt: skip
