"""Attentive probe: the preset heads, the grid (one pass == one by one), the task end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import make_imagefolder
from pydantic import ValidationError

from downstream.attentive_probe import (
    PRESETS,
    AttentiveHead,
    AttentiveProbeConfig,
    CachedTokens,
    build_grid,
    head_input,
    make_head,
    train_grid,
)
from downstream.base import TaskContext, get_task
from harness.core.config import DataConfig, EncoderConfig
from pretrain.encoders.vit import ViTEncoder


def _tokens(n=48, blocks=3, t=5, d=64, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, blocks, t, d, generator=g)
    x[:, :, 0, :classes] += 3 * torch.nn.functional.one_hot(y, classes).float()[:, None]
    return CachedTokens(x.half(), y, torch.device("cpu"))


def test_grid_in_one_pass_equals_heads_trained_one_by_one():
    cfg = AttentiveProbeConfig(lrs=[1e-3, 3e-2], weight_decays=[0.1], layers=[-1, -2],
                               aim_avg_blocks=2, epochs=2, batch_size=8, warmup_epochs=0.5)
    src = _tokens(n=32)
    fit = torch.arange(28)
    grid = build_grid(cfg, [-1, -2], 64, 3, seed=3, device=torch.device("cpu"))
    assert len(grid) == 5 * 2 * 1 * 2  # presets x lrs x wds x layers
    init = [h.model.fc.weight.detach().clone() for h in grid]
    train_grid(grid, src, fit, cfg, seed=3)
    for h, w0 in zip(grid, init, strict=True):
        alone = make_head(h.preset, h.lr, h.weight_decay, h.layer, 64, 3, 3, torch.device("cpu"))
        assert torch.equal(alone.model.fc.weight, w0)  # the same init
        train_grid([alone], src, fit, cfg, seed=3)
        a, b = h.model.state_dict(), alone.model.state_dict()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), (h.preset, k)
        assert not torch.equal(a["fc.weight"], w0)  # it trained


def test_heads_of_one_preset_start_equal_and_presets_differ():
    a = make_head("vjepa", 1e-3, 0.0, -1, 64, 3, 0, torch.device("cpu")).model.state_dict()
    b = make_head("vjepa", 1e-2, 0.1, -2, 64, 3, 0, torch.device("cpu")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(make_head("cae", 1e-3, 0.0, -1, 64, 3, 0, torch.device("cpu")).model.state_dict()) != set(a)


def test_preset_structure():
    d = 128
    heads = {p: AttentiveHead(PRESETS[p], d, 10) for p in PRESETS}
    assert all(h.num_heads == d // 64 for h in heads.values())  # D/64 heads of width 64
    assert len(heads["vjepa2"].blocks) == 3 and len(heads["vjepa"].blocks) == 0
    assert isinstance(heads["cae"].out_bn, torch.nn.BatchNorm1d) and not heads["cae"].out_bn.affine
    assert isinstance(heads["cae"].norm_q, torch.nn.LayerNorm)
    assert isinstance(heads["aim"].token_norm, torch.nn.BatchNorm1d)
    assert not heads["aim"].token_norm.affine
    # CAPI: a query, key / value projections and the classifier, nothing else
    n_capi = sum(p.numel() for p in heads["capi"].parameters())
    assert n_capi == d + 2 * (d * d + d) + (d * 10 + 10)


def test_one_token_attention_returns_its_value_projection():
    """With a single token the softmax weight is 1: CAPI's pooled vector is ``v(x)``."""
    torch.manual_seed(0)
    head = AttentiveHead(PRESETS["capi"], 128, 4).eval()
    x = torch.randn(5, 1, 128)
    with torch.no_grad():
        assert torch.allclose(head.pooled(x), head.v(x[:, 0]), atol=1e-5)


def test_aim_input_averages_the_last_blocks():
    t = torch.arange(4.0).view(1, 4, 1, 1).expand(2, 4, 3, 2)  # block i holds i
    assert torch.equal(head_input(t, -1, "aim", 3), torch.full((2, 3, 2), 2.0))  # (1+2+3)/3
    assert torch.equal(head_input(t, -2, "aim", 3), torch.full((2, 3, 2), 1.0))  # (0+1+2)/3
    assert torch.equal(head_input(t, -1, "vjepa", 3), torch.full((2, 3, 2), 3.0))


def test_config_rejects_layers_without_the_last_block():
    with pytest.raises(ValidationError, match="include -1"):
        AttentiveProbeConfig(layers=[-2])
    with pytest.raises(ValidationError, match="from the end"):
        AttentiveProbeConfig(layers=[-1, 2])


@pytest.mark.parametrize("source", ["cache", pytest.param("online", marks=pytest.mark.slow)])
def test_task_end_to_end_above_chance_encoder_unchanged(source, tmp_path):
    root = make_imagefolder(tmp_path / "data", classes=3, per_class=12)
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = AttentiveProbeConfig(presets=["vjepa", "capi", "aim"], lrs=[3e-2], weight_decays=[0.01],
                               layers="all", epochs=8, batch_size=8, token_source=source,
                               cache_dir=str(tmp_path / "cache"), holdout_fraction=0.2)
    logs: list[str] = []
    ctx = TaskContext(data=DataConfig(source=str(root), eval_crop_pct=1.0), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path / "out", log=logs.append)
    res = get_task("attentive_probe").run(enc, cfg, ctx)
    assert res.metrics["top1"] > 60.0  # chance: 33.3
    heads = res.details["heads"]
    assert len(heads) == 3 * 2  # presets x layers (depth 2)
    last = max((h for h in heads if h["layer"] == -1), key=lambda h: h["holdout_top1"])
    best = max(heads, key=lambda h: h["holdout_top1"])
    assert res.metrics["top1"] == last["val_top1"]  # chosen on holdout, reported on val
    assert res.metrics["top1_best_layer"] == best["val_top1"]
    assert res.details["token_source"] == source
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    if source == "cache":
        assert res.details["token_cache_bytes"] > 0
        assert any("MiB (fp16)" in m for m in logs)  # the disk cost is printed
        quick = cfg.model_copy(update={"presets": ["capi"], "epochs": 1})
        again = get_task("attentive_probe").run(enc, quick, ctx)
        assert any("read from cache" in m for m in logs)
        assert again.details["token_cache_bytes"] == res.details["token_cache_bytes"]


def test_auto_caches_tokens_only_when_they_fit():
    from downstream.attentive_probe import AttentiveProbe

    mode = AttentiveProbe._source_mode
    fits = 1000 * 6 * 64 * 128 * 2  # images x blocks x tokens x width x 2 bytes (fp16)
    assert mode(AttentiveProbeConfig(cache_max_gb=fits / 2**30), 1000, 6, 64, 128) == "cache"
    assert mode(AttentiveProbeConfig(cache_max_gb=(fits - 1) / 2**30), 1000, 6, 64, 128) == "online"
    assert mode(AttentiveProbeConfig(token_source="online"), 1, 1, 1, 1) == "online"
