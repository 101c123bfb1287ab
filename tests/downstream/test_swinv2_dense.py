"""SwinV2 encoders in the dense tasks: our timm SwinV2 itself as the backbone
(:mod:`downstream._mm.swinv2_dense`; OpenMMLab has no SwinV2). The backbone must return, at the
task's size, the stage features timm's model computes; weights pretrained at one size load at
another (SwinV2's continuous position bias); LLRD groups and weight decay follow the reference;
then detection and segmentation end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from downstream._mm.swinv2_dense import DenseSwinV2
from harness.core.config import ConfigError, DataConfig, EncoderConfig
from harness.core.data.shapes import ShapesSpec, ensure_shapes
from pretrain.encoders import create_encoder

SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=96,
                  train_scenes=16, val_scenes=4, seed=0)  # fmt: skip


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_shapes(SPEC, cache_root=tmp_path_factory.getbasetemp() / "shapes-cache")


def _randomized(cfg: EncoderConfig, seed: int = 0) -> torch.nn.Module:
    """A SwinV2 encoder whose every parameter (post-norms, position MLPs, logit scales) is
    random, so a tensor left out or misplaced cannot go unnoticed."""
    torch.manual_seed(seed)
    enc = create_encoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc


def _timm_stages(enc: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's output through timm's modules, ``[B, C_i, H_i, W_i]``: the final norm on
    the last stage, an identity-affine LayerNorm (the new norms' start) on the others."""
    t = enc.swin.patch_embed(x)
    outs = []
    for i, stage in enumerate(enc.swin.layers):
        t = stage(t)
        last = i == len(enc.swin.layers) - 1
        y = enc.swin.norm(t) if last else F.layer_norm(t, t.shape[-1:])
        outs.append(y.permute(0, 3, 1, 2))
    return outs


def test_backbone_reproduces_timm_stage_features(tmp_path):
    cfg = EncoderConfig(arch="swinv2_micro_32", img_size=64)
    enc = _randomized(cfg)
    enc.save_timm(tmp_path / "e.pth")
    bb = DenseSwinV2(cfg.model_dump(mode="json"), img_size=64,
                     init_checkpoint=str(tmp_path / "e.pth")).eval()  # fmt: skip
    bb.init_weights()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = bb(x), _timm_stages(enc, x)
    assert [tuple(g.shape) for g in got] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)
    # a smaller input is padded to the built size and its maps cropped back
    with torch.no_grad():
        small = bb(x[:, :, :40, :56])
    assert [tuple(s.shape[-2:]) for s in small] == [(10, 14), (5, 7), (3, 4)]


def test_weights_pretrained_at_another_size_load(tmp_path):
    """SwinV2's bias is an MLP over relative coordinates: no size-bound tensor is stored, so a
    32 px encoder loads into a 64 px backbone (and reproduces a 64 px timm model)."""
    enc = _randomized(EncoderConfig(arch="swinv2_micro_32"))
    enc.save_timm(tmp_path / "e.pth")
    bb = DenseSwinV2(EncoderConfig(arch="swinv2_micro_32").model_dump(mode="json"), img_size=64,
                     init_checkpoint=str(tmp_path / "e.pth")).eval()  # fmt: skip
    bb.init_weights()
    big = create_encoder(EncoderConfig(arch="swinv2_micro_32", img_size=64)).eval()
    big.swin.load_state_dict(enc.swin.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bb(x)[-1], _timm_stages(big, x)[-1], atol=1e-5)


def test_refuses_other_families_and_oversized_inputs():
    with pytest.raises(ConfigError, match="not a SwinV2"):
        DenseSwinV2(EncoderConfig(arch="swin_micro_32").model_dump(mode="json"), img_size=32)
    bb = DenseSwinV2(EncoderConfig(arch="swinv2_micro_32").model_dump(mode="json"), img_size=32)
    with pytest.raises(ConfigError, match="does not fit the SwinV2 backbone built for 32x32"):
        bb(torch.randn(1, 3, 48, 32))


@pytest.mark.mm
def test_swinv2_layer_decay_groups():
    from downstream._mm.common import LayerDecayOptimWrapperConstructor

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            enc = EncoderConfig(arch="swinv2_micro_32").model_dump(mode="json")
            self.backbone = DenseSwinV2(enc, img_size=32)
            self.head = torch.nn.Linear(4, 3)

    model = Model()
    bb = model.backbone
    assert bb.num_layers == 3
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

    pre = "backbone.encoder.swin."
    assert lr_wd(pre + "patch_embed.proj.weight") == (0.5**4, 0.05)
    assert lr_wd(pre + "layers.1.blocks.0.attn.qkv.weight") == (0.5**2, 0.05)
    assert lr_wd(pre + "layers.1.downsample.reduction.weight") == (0.5**2, 0.05)
    assert lr_wd(pre + "layers.1.blocks.0.attn.cpb_mlp.0.weight") == (0.5**2, 0.0)
    assert lr_wd(pre + "layers.2.blocks.0.attn.logit_scale") == (0.5**1, 0.0)
    assert lr_wd("backbone.norms.0.weight") == (1.0, 0.0)
    assert lr_wd("head.weight") == (1.0, 0.05)
    assert sum(len(g["params"]) for g in groups) == len(named) - 1  # the mask token is frozen


def _ctx(shapes_root: Path, out: Path):
    from downstream.base import TaskContext

    return TaskContext(data=DataConfig(source=str(shapes_root)), seed=0,
                       device=torch.device("cpu"), out_dir=out, log=lambda m: None)  # fmt: skip


@pytest.mark.mm
@pytest.mark.slow
def test_swinv2_detection_and_segmentation_end_to_end(shapes_root, tmp_path):
    from mmengine.config import Config

    from downstream.base import get_task
    from downstream.detection import DetectionConfig
    from downstream.segmentation import SegmentationConfig

    torch.manual_seed(0)
    enc = create_encoder(EncoderConfig(arch="swinv2_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    det = DetectionConfig(img_size=64, fpn_channels=16, roi_fc_channels=32, batch_size=2,
                          max_iters=3, warmup_iters=1, lr=1e-4, lr_base_batch=None, score_thr=0.0,
                          checkpoint_interval=1000, log_level="WARNING")  # fmt: skip
    res = get_task("detection").run(enc, det, _ctx(shapes_root, tmp_path / "det"))
    assert set(res.metrics) == {"box_ap", "mask_ap"}
    assert all(0.0 <= v <= 100.0 for v in res.metrics.values())
    assert res.details["iters_run"] == 3 and np.isfinite(res.details["losses"]).all()
    mm = Config.fromfile(res.details["mm_config"])
    assert mm.model.backbone.type == "MimSwinV2" and mm.model.backbone.img_size == 64
    assert mm.model.neck.in_channels == [16, 32, 64]
    assert mm.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.9  # swin_layer_decay

    seg = SegmentationConfig(crop_size=64, decode_channels=16, aux_channels=8, batch_size=2,
                             max_iters=3, warmup_iters=1, lr=1e-4, lr_base_batch=None,
                             checkpoint_interval=1000, log_level="WARNING")  # fmt: skip
    res = get_task("segmentation").run(enc, seg, _ctx(shapes_root, tmp_path / "seg"))
    assert set(res.metrics) == {"miou"} and 0.0 <= res.metrics["miou"] <= 100.0
    mm = Config.fromfile(res.details["mm_config"])
    assert mm.model.backbone.type == "MimSwinV2" and mm.model.decode_head.in_channels == [16, 32, 64]
    with pytest.raises(ConfigError, match="remove out_indices"):
        get_task("segmentation").run(enc, seg.model_copy(update={"out_indices": [0, 1, 2]}),
                                     _ctx(shapes_root, tmp_path / "seg2"))  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
