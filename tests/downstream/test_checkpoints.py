"""Checkpoint import / export: every family's key layout is built from a model with known
weights, imported, and the imported encoder must reproduce the original's outputs."""

from __future__ import annotations

import re
import sys
import types

import pytest
import timm
import torch
from checkpoint_layouts import (
    MICRO,
    SWIN_64,
    beit_layout,
    mae_layout,
    mmpretrain_layout,
    mmpretrain_swin_layout,
    pretraining_checkpoint,
    simmim_vit_layout,
    swin_original_layout,
)
from checkpoint_layouts import feature_diff as _diff
from checkpoint_layouts import images as _x
from checkpoint_layouts import random_beit as _beit
from checkpoint_layouts import random_swin as _swin
from checkpoint_layouts import random_vit as _vit
from checkpoint_layouts import randomize as _randomize
from checkpoint_layouts import save as _save

from downstream.checkpoints import (
    detect_family,
    encoder_from_timm_name,
    export_encoder,
    import_checkpoint,
    load_checkpoint,
)
from harness.core.config import ENCODER_PRESETS, EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoders.swin import SwinEncoder
from pretrain.encoders.vit import ViTEncoder


@pytest.fixture
def swin64(monkeypatch: pytest.MonkeyPatch) -> EncoderConfig:
    monkeypatch.setitem(ENCODER_PRESETS, "swin_test_64", SWIN_64)
    return EncoderConfig(arch="swin_test_64")


# --------------------------------------------------------------------------- round trips


def test_mimbench_file_round_trip(tmp_path):
    enc = _vit()
    enc.save_timm(tmp_path / "e.pth")
    got, rep = load_checkpoint(tmp_path / "e.pth")
    assert rep.family == "mimbench" and not rep.missing and not rep.unexpected
    assert _diff(enc, got) == 0.0


def test_plain_timm_state_dict_with_head(tmp_path):
    enc = _vit()
    sd = {**enc.timm_state_dict(), "head.weight": torch.randn(5, 32), "head.bias": torch.randn(5)}
    path = _save(sd, tmp_path / "t.pth")
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert rep.family == "timm" and rep.target == "vit"
    assert rep.dropped["classifier head"] == ["head.weight", "head.bias"]
    assert _diff(enc, got) == 0.0


def test_foreign_safetensors_without_our_metadata(tmp_path):
    """A hub-style ``model.safetensors`` (a timm state dict, no mimbench meta, no sidecar)."""
    from safetensors.torch import save_file

    enc = _vit(seed=3)
    sd = {**enc.timm_state_dict(), "head.weight": torch.randn(5, 32), "head.bias": torch.randn(5)}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    got, rep = load_checkpoint(tmp_path / "model.safetensors", cfg=MICRO)
    assert rep.family == rep.detected == "timm" and rep.container is None
    assert sorted(rep.dropped["classifier head"]) == ["head.bias", "head.weight"]
    assert _diff(enc, got) == 0.0


def test_timm_layer_scale_and_no_qkv_bias_fold_exactly(tmp_path):
    torch.manual_seed(0)
    m = _randomize(
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=0,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            init_values=0.1,
            qkv_bias=False,
        ),
        3,
    )
    path = _save(m.state_dict(), tmp_path / "ls.pth")
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert any("layer-scale" in n for n in rep.notes) and any(
        "zeros inserted" in n for n in rep.notes
    )
    with torch.no_grad():
        ref = m.forward_features(_x())
        assert float((got.forward_features(_x()) - ref).abs().max()) < 1e-5


def test_mae_release_layout(tmp_path):
    enc = _vit()
    path = _save(mae_layout(enc), tmp_path / "mae.pth")
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert rep.family == "mae" and rep.container == "model"
    assert len(rep.dropped["MAE decoder"]) == 4 and rep.dropped["MAE decoder's mask token"] == [
        "mask_token"
    ]
    assert _diff(enc, got) == 0.0


@pytest.mark.parametrize("shared", [False, True])
def test_beit_release_layout(tmp_path, shared):
    enc = _beit(shared)
    path = _save(beit_layout(enc), tmp_path / "beit.pth")
    got, rep = load_checkpoint(path)  # heads read from the relative position table
    assert rep.family == "beit" and rep.target == "beit"
    assert rep.options["use_shared_rel_pos_bias"] is shared and rep.options["layer_scale"]
    assert "lm_head.weight" in rep.dropped["classifier / token-prediction head"]
    assert "encoder mask token loaded" in rep.notes
    assert torch.equal(got.mask_token, enc.mask_token)
    assert _diff(enc, got) == 0.0
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():  # the mask token path matches too
        assert torch.equal(got.forward_features(_x(), mask), enc.forward_features(_x(), mask))


def test_simmim_vit_layout(tmp_path):
    enc = _beit(shared=True)
    path = _save(simmim_vit_layout(enc), tmp_path / "simmim.pth")
    got, rep = load_checkpoint(path)
    assert rep.family == "simmim" and rep.target == "beit"
    assert sorted(rep.dropped["SimMIM decoder"]) == ["decoder.0.bias", "decoder.0.weight"]
    assert _diff(enc, got) == 0.0


def test_simmim_swin_layout(tmp_path):
    torch.manual_seed(0)
    enc = _randomize(SwinEncoder(EncoderConfig(arch="swin_micro_32")), 2)
    sd = {f"encoder.{k}": v for k, v in swin_original_layout(enc).items()}
    sd["encoder.mask_token"] = enc.mask_token.detach().clone()
    sd["decoder.0.weight"] = torch.randn(3 * 32 * 32, 64, 1, 1)
    path = _save({"model": sd}, tmp_path / "simmim_swin.pth")
    got, rep = load_checkpoint(path)
    assert (
        rep.family == "simmim" and rep.target == "swin" and rep.encoder["arch"] == "swin_micro_32"
    )
    assert _diff(enc, got) == 0.0


def test_mmpretrain_vit_with_layer_scale(tmp_path):
    torch.manual_seed(0)
    m = _randomize(
        timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=0,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            init_values=0.1,
        ),
        4,
    )
    path = _save(mmpretrain_layout(m.state_dict()), tmp_path / "mmpre.pth")
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert rep.family == "mmpretrain" and rep.container == "state_dict"
    assert len(rep.dropped["not the backbone (neck / head / preprocessor)"]) == 2
    with torch.no_grad():
        assert float((got.forward_features(_x()) - m.forward_features(_x())).abs().max()) < 1e-5


def test_mmpretrain_beit(tmp_path):
    enc = _beit(shared=False)
    path = _save(mmpretrain_layout(enc.timm_state_dict()), tmp_path / "mmbeit.pth")
    got, rep = load_checkpoint(path)
    assert rep.family == "mmpretrain" and rep.target == "beit"
    assert _diff(enc, got) == 0.0


def _swin_stages(enc: SwinEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return enc.eval().forward_intermediates(x, list(range(enc.num_stages)), norm=True)


def test_mmpretrain_swin(tmp_path, swin64):
    enc = _swin(swin64)
    ckpt = mmpretrain_swin_layout(enc)
    sd = ckpt["state_dict"]
    assert detect_family(sd, None, "state_dict") == "mmpretrain"
    # an mmpretrain Swin built with out_indices (0, 1, 2) also keeps the earlier stages' norms
    sd["backbone.norm0.weight"], sd["backbone.norm0.bias"] = torch.ones(16), torch.zeros(16)
    path = _save(ckpt, tmp_path / "mmswin.pth")
    got, rep = load_checkpoint(path)  # auto-detected, architecture from the keys
    assert rep.family == rep.detected == "mmpretrain" and rep.target == "swin"
    assert rep.encoder["arch"] == "swin_test_64" and not rep.missing and not rep.unexpected
    assert sorted(rep.dropped["not the backbone (neck / head / preprocessor)"]) == [
        "head.fc.bias",
        "head.fc.weight",
    ]
    assert len(rep.dropped["index / mask buffer (rebuilt)"]) == 6  # one per block
    assert rep.dropped["output norm of an earlier stage (timm's Swin has none)"] == [
        "backbone.norm0.weight",
        "backbone.norm0.bias",
    ]
    assert rep.loaded == len(enc.timm_state_dict())  # timm's index buffers are not persistent
    for k, v in enc.timm_state_dict().items():
        assert torch.equal(got.swin.state_dict()[k], v), k
    x = _x(size=64)
    for a, b in zip(_swin_stages(got, x), _swin_stages(enc, x), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert _diff(enc, got, size=64) < 1e-5
    # mmpretrain's SimMIM Swin keeps its mask token in the backbone
    sd["backbone.mask_token"] = torch.randn(1, 1, 16)
    got, rep = load_checkpoint(_save(ckpt, tmp_path / "mmsimmim.pth"), cfg=swin64)
    assert "encoder mask token loaded" in rep.notes
    assert torch.equal(got.mask_token, sd["backbone.mask_token"])


def test_mmpretrain_swin_missing_and_unknown_keys_are_reported(tmp_path, swin64):
    ckpt = mmpretrain_swin_layout(_swin(swin64))
    sd = ckpt["state_dict"]
    del sd["backbone.stages.1.blocks.0.norm2.weight"], sd["backbone.norm2.bias"]
    sd["backbone.absolute_pos_embed"] = torch.zeros(1, 256, 16)
    path = _save(ckpt, tmp_path / "partial.pth")
    with pytest.raises(
        CheckpointError,
        match=r"2 encoder weights missing.*layers\.1\.blocks\.0\.norm2\.weight.*"
        r"1 checkpoint tensors unused \(backbone\.absolute_pos_embed\)",
    ):
        load_checkpoint(path)
    got, rep = load_checkpoint(path, allow_partial=True)
    assert rep.partial and rep.missing == ["layers.1.blocks.0.norm2.weight", "norm.bias"]
    assert rep.unexpected == ["backbone.absolute_pos_embed"]


@pytest.mark.mm
def test_mmpretrain_swin_layout_is_openmmlabs(swin64):
    """The layout built above is what OpenMMLab's own Swin loads: mmdet's ``SwinTransformer``
    (mmpretrain's has the same keys) with those weights computes our encoder's stage features,
    and mmcv's ``PatchMerging`` (mmpretrain's) equals mmdet's (same ``nn.Unfold`` order)."""
    import torch.nn.functional as F
    from mmcv.cnn.bricks.transformer import PatchMerging as MmcvMerging
    from mmdet.models.backbones import SwinTransformer
    from mmdet.models.layers import PatchMerging as MmdetMerging

    from downstream._mm.swin_dense import mm_swin_kwargs

    enc = _swin(swin64)
    sd = {
        k.removeprefix("backbone."): v
        for k, v in mmpretrain_swin_layout(enc)["state_dict"].items()
        if k.startswith("backbone.") and not k.endswith("relative_position_index")
    }
    model = SwinTransformer(**mm_swin_kwargs(swin64, 0.0))
    model.eval()  # (mmdet's Swin.train returns None)
    res = model.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    assert all(
        k.endswith("relative_position_index") or k.startswith(("norm0.", "norm1."))
        for k in res.missing_keys
    ), res.missing_keys
    x = _x(size=64)
    with torch.no_grad():
        got = model(x)
    ref = _swin_stages(enc, x)
    # mmdet's new output norms of the earlier stages are identity-affine LayerNorms
    ref[:-1] = [
        F.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2]).permute(0, 3, 1, 2) for r in ref[:-1]
    ]
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and torch.allclose(g, r, atol=1e-5), float((g - r).abs().max())

    torch.manual_seed(0)
    a, b = MmcvMerging(8, 16), MmdetMerging(8, 16)
    b.load_state_dict(a.state_dict())
    t = torch.randn(2, 6 * 4, 8)
    assert torch.equal(a(t, (6, 4))[0], b(t, (6, 4))[0])


def test_our_pretraining_checkpoint(tmp_path):
    encoder, ckpt = pretraining_checkpoint()
    path = _save(ckpt, tmp_path / "checkpoint.pth")
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert rep.family == "mimbench_ckpt" and "encoder mask token loaded" in rep.notes
    assert _diff(encoder, got) == 0.0


def test_export_then_import_and_timm_loads_it(tmp_path):
    enc = _beit(shared=True, abs_pos=True)
    paths = export_encoder(enc, tmp_path / "out" / "enc")
    assert sorted(p.suffix for p in paths) == [".json", ".pth", ".safetensors"]
    for suffix in (".pth", ".safetensors"):
        got, rep = load_checkpoint(tmp_path / "out" / f"enc{suffix}")
        assert rep.family == "mimbench" and _diff(enc, got) == 0.0  # meta from sidecar / metadata
    # timm rebuilds it from the exported state dict alone
    import json

    arch = json.loads((tmp_path / "out" / "enc.json").read_text())
    m = timm.create_model(
        arch["timm_name"],
        pretrained=False,
        checkpoint_path=str(tmp_path / "out" / "enc.pth"),
        **arch["timm_kwargs"],
    ).eval()
    with torch.no_grad():
        assert torch.equal(m.forward_features(_x()), enc.forward_features(_x()))


def test_export_vit_loads_in_timm_without_mimbench(tmp_path):
    enc = _vit()
    export_encoder(enc, tmp_path / "v.pth", formats=("safetensors",))
    from safetensors.torch import load_file

    m = timm.create_model(enc.cfg.timm_name, pretrained=False, **enc.cfg.timm_kwargs()).eval()
    m.load_state_dict(load_file(str(tmp_path / "v.safetensors")))
    with torch.no_grad():
        assert torch.equal(m.forward_features(_x()), enc.forward_features(_x()))


# --------------------------------------------------------------------------- conversions, errors


def test_pos_embed_and_rel_tables_are_resized(tmp_path):
    from timm.layers import resample_abs_pos_embed

    enc = _vit()
    path = _save(enc.timm_state_dict(), tmp_path / "v.pth")
    big = EncoderConfig(arch="vit_micro_32", img_size=48, pos_embed="learned")
    got, rep = load_checkpoint(path, cfg=big)
    expect = resample_abs_pos_embed(
        enc.vit.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1
    )
    assert torch.allclose(got.vit.pos_embed, expect) and "4x4 -> 6x6" in " ".join(rep.notes)
    assert got.forward_features(_x(size=48)).shape == (2, 37, 32)
    beit = _beit(shared=False)
    got, rep = load_checkpoint(_save(beit_layout(beit), tmp_path / "b.pth"), img_size=48)
    assert got.beit.blocks[0].attn.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert any("relative position bias" in n for n in rep.notes)


def test_partial_load_is_refused_unless_allowed(tmp_path):
    enc = _vit()
    sd = enc.timm_state_dict()
    del sd["norm.weight"], sd["norm.bias"]
    sd["extra.weight"] = torch.randn(3)
    path = _save(sd, tmp_path / "p.pth")
    with pytest.raises(
        CheckpointError,
        match=r"2 encoder weights missing.*norm\.bias.*1 checkpoint tensors unused.*allow-partial",
    ):
        load_checkpoint(path, cfg=MICRO)
    got, rep = load_checkpoint(path, cfg=MICRO, allow_partial=True)
    assert (
        rep.partial
        and rep.missing == ["norm.bias", "norm.weight"]
        and rep.unexpected == ["extra.weight"]
    )
    assert torch.equal(got.vit.blocks[0].attn.qkv.weight, enc.vit.blocks[0].attn.qkv.weight)


def test_shape_mismatch_and_wrong_config_name_the_fix(tmp_path):
    path = _save(_vit().timm_state_dict(), tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="embed_dim: checkpoint 32 vs config 128"):
        load_checkpoint(path, cfg=EncoderConfig(arch="vit_tiny_32"))
    with pytest.raises(CheckpointError, match="cannot infer num_heads for embed_dim 32"):
        load_checkpoint(path)  # 32 is no multiple of 64: the config must say


def test_unsafe_pickle_is_refused_with_the_reason(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.pth"
    torch.save({"model": _vit().timm_state_dict(), "cfg": Evil()}, path)
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*pickled 'print' object.*arbitrary code"
    ):
        load_checkpoint(path)


def test_yacs_config_inside_a_checkpoint_is_refused(tmp_path, monkeypatch):
    """SimMIM's training checkpoints pickle their yacs config: refused, with the way out."""
    mod = types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    path = tmp_path / "simmim_ckpt.pth"
    torch.save(
        {"model": {"encoder.cls_token": torch.zeros(1, 1, 32)}, "config": CfgNode(a=1)}, path
    )
    with pytest.raises(CheckpointError, match=r"yacs\.config\.CfgNode.*weights\.pth"):
        load_checkpoint(path)


def test_unknown_layout_and_forced_format(tmp_path):
    path = _save({"foo.weight": torch.randn(2, 2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="cannot tell the format.*--format"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="did you mean 'beit'"):
        load_checkpoint(path, fmt="beat")
    enc = _vit()
    path = _save({"model": enc.timm_state_dict()}, tmp_path / "m.pth")
    assert detect_family(enc.timm_state_dict(), None, "model") == "mae"
    got, rep = load_checkpoint(path, cfg=MICRO, fmt="timm")
    assert rep.family == "timm" and rep.detected == "mae" and _diff(enc, got) == 0.0


def test_import_writes_a_mimbench_file(tmp_path):
    enc = _beit(shared=True)
    src = _save(simmim_vit_layout(enc), tmp_path / "s.pth")
    rep = import_checkpoint(src, tmp_path / "imported.pth")
    got, rep2 = load_checkpoint(tmp_path / "imported.pth")
    assert rep2.family == "mimbench" and rep2.target == "beit" and _diff(enc, got) == 0.0
    obj = torch.load(tmp_path / "imported.pth", weights_only=True)
    assert obj["mimbench"]["imported"]["family"] == rep.family == "simmim"


@pytest.mark.parametrize(
    "name, kind",
    [
        ("vit_tiny_patch16_224", "vit"),
        pytest.param("beit_base_patch16_224", "beit", marks=pytest.mark.slow),
    ],
)
def test_timm_model_names_build_random_encoders(name, kind):
    torch.manual_seed(0)
    enc, rep = encoder_from_timm_name(name)
    assert rep.target == kind and enc.cfg.img_size == 224
    with pytest.raises(CheckpointError, match="did you mean"):
        encoder_from_timm_name(name[:-1])


# --------------------------------------------------------------------------- command line, suites


def test_cli_export_import_and_eval_a_foreign_checkpoint(tiny_imagefolder, tmp_path, capsys):
    from harness.cli import main
    from harness.core.records import load_records

    assert main(["export", "random:vit_micro_32", "--out", str(tmp_path / "exp" / "enc")]) == 0
    out = capsys.readouterr().out
    assert "enc.safetensors" in out and "timm.create_model('vit_tiny_patch16_224'" in out
    assert (
        main(
            ["import", str(tmp_path / "exp" / "enc.safetensors"), "--out", str(tmp_path / "i.pth")]
        )
        == 0
    )
    assert "family mimbench" in capsys.readouterr().out
    # an MAE-layout file: detected, converted, recorded
    enc = _vit()
    mae = _save(mae_layout(enc), tmp_path / "mae.pth")
    common = [
        "--data",
        str(tiny_imagefolder),
        "--out",
        str(tmp_path / "runs"),
        "--arch",
        "vit_micro_32",
        "--set",
        "tasks.0.cache_features=false",
        "--set",
        "tasks.0.k=3",
        "--set",
        "tasks.0.extra_k=[]",
    ]
    assert main(["eval", "knn", "--encoder", str(mae), *common]) == 0
    rec = load_records(tmp_path / "runs" / "eval" / "records", strict=True)[0]
    assert rec.status == "ok" and rec.encoder.source == "checkpoint"
    assert rec.details["import"]["family"] == "mae" and rec.task.name == "knn"
    # a partial load goes through only when asked (the suite entry's format / allow_partial)
    sd = enc.timm_state_dict()
    del sd["norm.bias"]
    part = _save(sd, tmp_path / "part.pth")
    # refused: a failed record, and the command exits 1 (a failed stage is no success)
    assert main(["eval", "knn", "--encoder", str(part), "--name", "p1", *common]) == 1
    recs = {r.encoder.name: r for r in load_records(tmp_path / "runs" / "eval" / "records")}
    assert recs["p1"].status == "failed" and "allow-partial" in recs["p1"].error.message
    assert (
        main(
            [
                "eval",
                "knn",
                "--encoder",
                str(part),
                "--name",
                "p2",
                "--format",
                "timm",
                "--allow-partial",
                *common,
            ]
        )
        == 0
    )
    recs = {r.encoder.name: r for r in load_records(tmp_path / "runs" / "eval" / "records")}
    assert recs["p2"].status == "ok" and recs["p2"].encoder.checkpoint == str(part)
    assert recs["p2"].details["import"]["missing"] == ["norm.bias"]
    assert recs["p2"].config["encoder"]["format"] == "timm"
    assert "MISSING 1" in capsys.readouterr().out


def test_suite_entry_format_and_allow_partial(tiny_imagefolder, tmp_path):
    from harness.core.config import ConfigError, SuiteConfig, validate_config
    from harness.core.fsutil import config_hash
    from harness.core.records import load_records
    from harness.runner import obtain_encoder, run_suite
    from harness.stages import run_config_for

    enc = _vit()
    mae = _save(mae_layout(enc), tmp_path / "mae.pth")
    sd = enc.timm_state_dict()
    del sd["norm.bias"]
    part = _save(sd, tmp_path / "part.pth")
    knn = {"name": "knn", "k": 3, "extra_k": [], "cache_features": False}

    def suite(*encoders: dict) -> SuiteConfig:
        cfg = validate_config({
            "kind": "suite", "name": "fmt", "output_dir": str(tmp_path / "runs"),
            "data": {"source": str(tiny_imagefolder)}, "encoders": list(encoders), "tasks": [knn],
        })
        assert isinstance(cfg, SuiteConfig)
        return cfg

    micro = MICRO.model_dump(mode="json")
    # `format: mae` on an MAE-layout file loads it
    s = suite({"name": "m", "checkpoint": str(mae), "format": "mae", "encoder": micro})
    handle = obtain_encoder(s.encoders[0], s, 0, tmp_path, lambda m: None)
    assert handle.extra["import"]["family"] == "mae"
    assert _diff(handle.encoder, enc) < 1e-5
    # a forced family that does not fit the file is refused
    s = suite({"name": "m", "checkpoint": str(mae), "format": "swin", "encoder": micro})
    with pytest.raises(CheckpointError):
        obtain_encoder(s.encoders[0], s, 0, tmp_path, lambda m: None)
    # a typo gets a did-you-mean naming the key
    with pytest.raises(ConfigError, match=r"encoders\.0\.format: .*'maee'; did you mean 'mae'"):
        suite({"name": "m", "checkpoint": str(mae), "format": "maee"})
    # the fields apply to checkpoint files only
    with pytest.raises(ConfigError, match="'format' applies to a 'checkpoint' file only"):
        suite({"name": "r", "format": "mae"})
    with pytest.raises(ConfigError, match="'allow_partial' does not apply to 'timm:"):
        suite({"name": "t", "checkpoint": "timm:vit_tiny_patch16_224", "allow_partial": True})
    # a missing key: refused by default, loaded with allow_partial and listed in the record
    s = suite({"name": "p1", "checkpoint": str(part), "encoder": micro},
              {"name": "p2", "checkpoint": str(part), "encoder": micro, "allow_partial": True})
    recs = {r.encoder.name: r for r in load_records(run_suite(s, log=lambda m: None))}
    assert recs["p1"].status == "failed" and "allow-partial" in recs["p1"].error.message
    assert recs["p2"].status == "ok"
    assert recs["p2"].details["import"]["partial"] is True
    assert recs["p2"].details["import"]["missing"] == ["norm.bias"]
    # without the fields, the hashed run config is what it was before they existed
    entry, task = s.encoders[0], s.tasks[0]
    rc = run_config_for(entry, task, s, 0)
    before = {
        "suite": s.name,
        "encoder": {k: v for k, v in entry.model_dump(mode="json").items()
                    if k not in ("format", "allow_partial")},
        "task": {k: v for k, v in task.model_dump(mode="json").items()
                 if k not in ("cache_dtype", "block")},  # both added later, out of the hash unset
        "data": s.data.model_dump(mode="json"),
        "seed": 0,
    }
    assert config_hash(rc) == config_hash(before)
    assert "allow_partial" in run_config_for(s.encoders[1], task, s, 0)["encoder"]
    assert recs["p1"].config_hash != recs["p2"].config_hash


@pytest.mark.slow
def test_suite_entry_with_a_simmim_checkpoint_and_a_timm_name(tiny_imagefolder, tmp_path):
    from harness.core.config import SuiteConfig
    from harness.core.records import load_records
    from harness.runner import run_suite

    src = _save(simmim_vit_layout(_beit(shared=True)), tmp_path / "simmim.pth")
    suite = SuiteConfig.model_validate(
        {
            "kind": "suite",
            "name": "imp",
            "output_dir": str(tmp_path / "runs"),
            "data": {"source": str(tiny_imagefolder)},
            "encoders": [
                {"name": "simmim-vit", "checkpoint": str(src)},
                {"name": "timm-vit", "checkpoint": "timm:vit_tiny_patch16_224"},
            ],
            "tasks": [
                {
                    "name": "knn",
                    "k": 3,
                    "extra_k": [],
                    "cache_features": False,
                    "batch_size_extract": 36,
                }
            ],
        }
    )
    records = {r.encoder.name: r for r in load_records(run_suite(suite, log=lambda m: None))}
    assert (
        records["simmim-vit"].status == "ok"
        and records["simmim-vit"].details["import"]["target"] == "beit"
    )
    assert (
        records["timm-vit"].status == "ok"
        and records["timm-vit"].encoder.arch == "vit_tiny_patch16_224"
    )


# --------------------------------------------------------------------------- architecture: never guessed


TINY = EncoderConfig(arch="vit_tiny_32")  # 128 wide, 4 heads: the "embed_dim / 64" rule says 2
NO_HEADS_128 = r"cannot infer num_heads for embed_dim 128.*--arch vit_tiny_32"


def _heads(enc: torch.nn.Module) -> int:
    return int(enc.vit.blocks[0].attn.num_heads)


def _pretrain_tiny(data, out):
    """A vit_tiny_32 SimMIM pretraining by the engine (2 steps): its stage directory."""
    from harness.core.config import PretrainConfig
    from pretrain.engine import pretrain

    cfg = PretrainConfig(
        data={"source": str(data)},
        encoder={"arch": "vit_tiny_32"},
        # the plain ViT (SimMIM's own ViT-B definition would build a BEiT-style encoder)
        recipe={"name": "simmim", "masking": {"mask_patch_size": 8}, "encoder_setup": "controlled"},
        train={"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "max_steps": 2,
               "ckpt_every_steps": 1, "num_recon_images": 0},
    )
    return pretrain(cfg, out, resume=False, log=lambda m: None)


def test_pretraining_checkpoint_loads_with_its_recorded_heads(tiny_imagefolder, tmp_path):
    import shutil

    from pretrain.encoders import load_encoder

    res = _pretrain_tiny(tiny_imagefolder, tmp_path / "stage")
    ref = load_encoder(res.encoder_path)  # the encoder file: 4 heads, from its metadata
    assert _heads(ref) == 4
    ckpt = tmp_path / "stage" / "checkpoint.pth"
    # in its stage directory, and copied away from it: the checkpoint records its config
    alone = tmp_path / "elsewhere" / "checkpoint.pth"
    alone.parent.mkdir()
    shutil.copy(ckpt, alone)
    for path in (ckpt, alone):
        got, rep = load_checkpoint(path)
        assert rep.family == "mimbench_ckpt" and _heads(got) == 4 and not rep.assumed
        assert _diff(ref, got) == 0.0
    # a checkpoint written before it recorded its config: the stage's config.yaml says, when
    # its hash is the checkpoint's ...
    ck = torch.load(ckpt, weights_only=True)
    del ck["encoder_config"]
    old = _save(ck, tmp_path / "stage" / "old_checkpoint.pth")
    got, rep = load_checkpoint(old)
    assert _heads(got) == 4 and _diff(ref, got) == 0.0
    assert any("config.yaml" in n for n in rep.notes)
    # ... and nothing says once it is separated from it: refused, naming what to pass
    old_alone = _save(ck, tmp_path / "elsewhere" / "old.pth")
    with pytest.raises(CheckpointError, match=NO_HEADS_128):
        load_checkpoint(old_alone)
    got, rep = load_checkpoint(old_alone, cfg=TINY)
    assert _heads(got) == 4 and _diff(ref, got) == 0.0
    # a config.yaml that is not the checkpoint's own is not trusted
    cfg_text = (tmp_path / "stage" / "config.yaml").read_text()
    (tmp_path / "elsewhere" / "config.yaml").write_text(cfg_text.replace("seed: 0", "seed: 1"))
    with pytest.raises(CheckpointError, match="cannot infer num_heads"):
        load_checkpoint(old_alone)


def test_export_without_its_sidecar_is_refused_or_takes_the_named_arch(tmp_path, capsys):
    from harness.cli import main

    torch.manual_seed(0)
    enc = _randomize(ViTEncoder(TINY), 4)
    export_encoder(enc, tmp_path / "exp" / "enc", formats=("timm",))
    got, _ = load_checkpoint(tmp_path / "exp" / "enc.pth")  # with its sidecar: recorded heads
    assert _heads(got) == 4 and _diff(enc, got) == 0.0
    bare = tmp_path / "bare.pth"
    bare.write_bytes((tmp_path / "exp" / "enc.pth").read_bytes())  # a plain timm state dict
    with pytest.raises(CheckpointError, match=NO_HEADS_128):
        load_checkpoint(bare)
    got, rep = load_checkpoint(bare, cfg=TINY)
    assert _heads(got) == 4 and _diff(enc, got) == 0.0 and not rep.assumed
    # the command line says the same and writes nothing; with --arch it imports
    out = tmp_path / "imported.pth"
    assert main(["import", str(bare), "--out", str(out)]) == 2
    assert "--arch vit_tiny_32" in capsys.readouterr().err and not out.exists()
    assert main(["import", str(bare), "--out", str(out), "--arch", "vit_tiny_32"]) == 0
    got, _ = load_checkpoint(out)
    assert _heads(got) == 4 and _diff(enc, got) == 0.0


def test_public_width_heads_are_assumed_out_loud(tmp_path):
    """Width 192 is ViT-Ti's: every public release has 3 heads; taken, and listed as assumed."""
    cfg = EncoderConfig(
        arch="vit_micro_32", embed_dim=192, num_heads=3, depth=1, pos_embed="learned"
    )
    torch.manual_seed(0)
    enc = _randomize(ViTEncoder(cfg), 5)
    path = _save(enc.timm_state_dict(), tmp_path / "v.pth")
    got, rep = load_checkpoint(path)
    assert _heads(got) == 3 and _diff(enc, got) == 0.0
    assert len(rep.assumed) == 1 and rep.assumed[0].startswith("num_heads 3")
    assert "ASSUMED" in rep.format() and rep.summary()["assumed"] == rep.assumed


def test_named_arch_must_be_the_recorded_one(tmp_path, capsys):
    from harness.cli import main

    torch.manual_seed(0)
    two = _randomize(ViTEncoder(EncoderConfig(arch="vit_tiny_32", num_heads=2)), 2)
    two.save_timm(tmp_path / "two.pth")
    export_encoder(two, tmp_path / "exp" / "two")
    exp = tmp_path / "exp"
    for path in (tmp_path / "two.pth", exp / "two.pth", exp / "two.safetensors"):
        with pytest.raises(CheckpointError, match=r"num_heads: checkpoint 2 vs named 4"):
            load_checkpoint(path, cfg=TINY)
    shape = r"embed_dim: checkpoint 32 vs named 128.*depth: checkpoint 2 vs named 6"
    with pytest.raises(CheckpointError, match=shape):
        load_checkpoint(_save_timm(_vit(), tmp_path / "micro.pth"), cfg=TINY)
    # naming what it is works, at another resolution too (positions resized)
    named = EncoderConfig(arch="vit_tiny_32", num_heads=2)
    got, rep = load_checkpoint(tmp_path / "two.pth", cfg=named)
    assert _heads(got) == 2 and _diff(two, got) == 0.0
    assert rep.arch_label() == "vit_tiny_32(num_heads=2)"
    got, rep = load_checkpoint(
        tmp_path / "two.pth", cfg=EncoderConfig(arch="vit_tiny_32", num_heads=2, img_size=48)
    )
    assert got.cfg.img_size == 48 and rep.arch_label() == "vit_tiny_32(num_heads=2, img_size=48)"
    # the command line: exit 2, both named, nothing written
    out = tmp_path / "o.pth"
    assert main(["import", str(exp / "two.pth"), "--arch", "vit_tiny_32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vit_tiny_32(num_heads=2)" in err and "named vit_tiny_32" in err and not out.exists()


def _save_timm(enc, path):
    enc.save_timm(path)
    return path


def test_record_names_the_architecture_that_ran(tiny_imagefolder, tmp_path):
    from harness.core.config import SuiteConfig, validate_config
    from harness.runner import obtain_encoder
    from harness.stages import pretrain_config_for, pretrain_stage_dir
    from pretrain.engine import ENCODER, SUMMARY

    torch.manual_seed(0)
    two = _randomize(ViTEncoder(EncoderConfig(arch="vit_tiny_32", num_heads=2)), 2)
    f = _save_timm(two, tmp_path / "two.pth")

    def obtain(entry: dict):
        s = validate_config({
            "kind": "suite", "name": "arch", "output_dir": str(tmp_path / "runs"),
            "data": {"source": str(tiny_imagefolder)}, "encoders": [entry],
            "tasks": [{"name": "knn"}],
        })
        assert isinstance(s, SuiteConfig)
        return s, obtain_encoder(s.encoders[0], s, 0, tmp_path, lambda m: None)

    _, h = obtain({"name": "r", "encoder": {"arch": "vit_micro_32", "num_heads": 1}})
    assert h.info.arch == "vit_micro_32(num_heads=1)" and _heads(h.encoder) == 1
    _, h = obtain({"name": "c", "checkpoint": str(f)})
    assert h.info.arch == "vit_tiny_32(num_heads=2)" and _heads(h.encoder) == 2
    assert _diff(two, h.encoder) == 0.0
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 2 vs named 4"):
        obtain({"name": "c", "checkpoint": str(f), "encoder": {"arch": "vit_tiny_32"}})
    # a pretraining stage whose encoder file is not the entry's architecture is refused
    entry = {"name": "p", "encoder": {"arch": "vit_tiny_32"},
             "pretrain": {"recipe": {"name": "simmim", "masking": {"mask_patch_size": 8},
                                     "encoder_setup": "controlled"}}}  # the plain ViT
    s = validate_config({
        "kind": "suite", "name": "arch", "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(tiny_imagefolder)}, "encoders": [entry], "tasks": [{"name": "knn"}],
    })
    stage = pretrain_stage_dir(tmp_path, pretrain_config_for(s.encoders[0], s, 0))
    stage.mkdir(parents=True)
    (stage / SUMMARY).write_text("{}")
    two.save_timm(stage / ENCODER)
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 2 vs named 4"):
        obtain(entry)
    torch.manual_seed(0)
    ViTEncoder(TINY).save_timm(stage / ENCODER)
    _, h = obtain(entry)
    assert h.info.arch == "vit_tiny_32" and _heads(h.encoder) == 4


# --------------------------------------------------------------------------- never overwrite


def test_import_and_export_never_overwrite_what_the_user_has(tmp_path, capsys):
    import os

    from harness.cli import main
    from harness.core.config import RecipeConfig
    from pretrain.model import MIMModel

    torch.manual_seed(0)
    model = MIMModel(MICRO, RecipeConfig(name="simmim", masking={"mask_patch_size": 16}))
    src = _save({"model": model.state_dict(), "step": 3}, tmp_path / "checkpoint.pth")
    before = src.read_bytes()
    arch = ["--arch", "vit_micro_32"]
    # the source itself, however spelled (another path, a link), even with --overwrite
    (tmp_path / "sub").mkdir()
    os.symlink(src, tmp_path / "link.pth")
    for out in (src, tmp_path / "sub" / ".." / "checkpoint.pth", tmp_path / "link.pth"):
        for extra in ([], ["--overwrite"]):
            assert main(["import", str(src), "--out", str(out), *arch, *extra]) == 2
            assert "a file this command reads" in capsys.readouterr().err
            assert src.read_bytes() == before
    # an existing output: only with --overwrite
    out = tmp_path / "enc.pth"
    out.write_bytes(b"mine")
    assert main(["import", str(src), "--out", str(out), *arch]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["import", str(src), "--out", str(out), *arch, "--overwrite"]) == 0
    got, rep = load_checkpoint(out)
    assert rep.family == "mimbench" and _diff(model.encoder, got) == 0.0
    # a failing import leaves nothing behind
    listing = sorted(os.listdir(tmp_path))
    assert main(["import", str(src), "--out", str(tmp_path / "new.pth"), "--format", "beit"]) == 2
    assert sorted(os.listdir(tmp_path)) == listing
    # export: into its own source, or over existing files, refused; --overwrite replaces
    enc_bytes = out.read_bytes()
    assert main(["export", str(out), "--out", str(tmp_path / "enc")]) == 2
    assert "a file this command reads" in capsys.readouterr().err and out.read_bytes() == enc_bytes
    exported = tmp_path / "x" / "e"
    assert main(["export", str(out), "--out", str(exported)]) == 0
    assert sorted(p.name for p in exported.parent.iterdir()) == ["e.json", "e.pth", "e.safetensors"]
    st = exported.with_suffix(".safetensors")
    st.write_bytes(b"mine")
    assert main(["export", str(out), "--out", str(exported)]) == 2
    assert "--overwrite" in capsys.readouterr().err and st.read_bytes() == b"mine"
    assert main(["export", str(out), "--out", str(exported), "--overwrite"]) == 0
    got, _ = load_checkpoint(st)
    assert _diff(model.encoder, got) == 0.0


# --------------------------------------------------------------------------- SwinV2


def _swinv2(seed: int = 2):
    from pretrain.encoders.swinv2 import SwinV2Encoder

    torch.manual_seed(0)
    return _randomize(SwinV2Encoder(EncoderConfig(arch="swinv2_micro_32")), seed)


def _swinv2_repo_layout(enc) -> dict[str, torch.Tensor]:
    """The Swin repo's SwinV2 (models/swin_transformer_v2.py): patch merging at the end of a
    stage, and its index, coordinate-table and mask buffers stored with the weights."""
    sd = {}
    for k, v in enc.timm_state_dict().items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd[k] = v
    w = enc.cfg.timm_kwargs()["window_size"]
    for s, layer in enumerate(enc.swin.layers):
        for b in range(len(layer.blocks)):
            pre = f"layers.{s}.blocks.{b}.attn."
            sd[pre + "relative_coords_table"] = torch.zeros(1, 2 * w - 1, 2 * w - 1, 2)
            sd[pre + "relative_position_index"] = torch.zeros(w * w, w * w, dtype=torch.long)
    sd["head.weight"] = torch.randn(10, enc.num_features)
    return sd


def test_simmim_swinv2_repo_layout(tmp_path):
    """SimMIM's SwinV2 runs (the Swin repo): 'encoder.' keys in the repo's layout beside the
    decoder; imported onto the SwinV2 wrapper with the window read from the coordinate table."""
    enc = _swinv2()
    sd = {f"encoder.{k}": v for k, v in _swinv2_repo_layout(enc).items()}
    sd["encoder.mask_token"] = enc.mask_token.detach().clone()
    sd["decoder.0.weight"] = torch.randn(3 * 16 * 16, 64, 1, 1)
    got, rep = load_checkpoint(_save({"model": sd}, tmp_path / "simmim_swinv2.pth"))
    assert rep.family == "simmim" and rep.target == "swinv2" and got.family == "swinv2"
    assert rep.encoder["arch"] == "swinv2_micro_32"
    assert not any("window" in a for a in rep.assumed)  # read from the coordinate table
    assert len(rep.dropped["index / mask buffer (rebuilt)"]) == 2 * 3  # two buffers per block
    assert _diff(enc, got) == 0.0
    assert torch.equal(got.mask_token, enc.mask_token)


def test_timm_swinv2_file_takes_the_presets_window(tmp_path):
    """timm's SwinV2 files store no size-bound buffer: the window is the preset's, said in the
    report; a named architecture of another shape is refused."""
    enc = _swinv2(3)
    sd = dict(enc.timm_state_dict())
    sd["head.fc.weight"] = torch.randn(10, enc.num_features)
    path = _save(sd, tmp_path / "timm_swinv2.pth")
    got, rep = load_checkpoint(path)
    assert rep.family == "swin" and rep.target == "swinv2"
    assert any("window 4 from preset swinv2_micro_32" in a for a in rep.assumed)
    assert _diff(enc, got) == 0.0
    with pytest.raises(CheckpointError, match="swinv2 with stages"):
        load_checkpoint(path, cfg=EncoderConfig(arch="swinv2_tiny_256"))
    again, rep2 = load_checkpoint(_save({"state_dict": got.timm_state_dict()}, tmp_path / "b.pth"))
    assert rep2.target == "swinv2" and _diff(enc, again) == 0.0


def test_encoder_file_of_a_swinv2_round_trips(tmp_path):
    enc = _swinv2(4)
    enc.save_timm(tmp_path / "e.pth")
    got, rep = load_checkpoint(tmp_path / "e.pth")
    assert rep.family == "mimbench" and got.family == "swinv2" and _diff(enc, got) == 0.0


def test_timm_name_of_a_swinv2():
    got, rep = encoder_from_timm_name("swinv2_tiny_window8_256")
    assert got.family == "swinv2" and rep.encoder["arch"] == "swinv2_tiny_256"
