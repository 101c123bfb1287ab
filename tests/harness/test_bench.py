"""``mimbench bench``: FLOP counts against hand-computed ones, rows, ratios, CSV, bad targets."""

from __future__ import annotations

import csv

import pytest
import torch
from flop_formulas import vit_forward_flops
from torch import nn

from harness import bench
from harness.cli import main
from harness.core import measure
from pretrain import bench as pretrain_bench


def test_count_flops_of_a_linear_layer_forward_and_backward():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)

    def step() -> None:
        lin(x).sum().backward()

    # forward 2*4*16*8; backward: grad of the weight only (x needs no grad), the same again
    assert measure.count_flops(step) == 2 * (2 * 4 * 16 * 8)


def test_frozen_forward_flops_match_the_vit_formula():
    step, size = bench.task_step("knn", "vit_micro_32", batch=3, device=torch.device("cpu"))
    assert size == 32
    want = 3 * vit_forward_flops(img=32, patch=8, dim=32, depth=2, mlp_ratio=2.0)
    assert measure.count_flops(step) == want


def test_finetune_step_costs_about_three_forwards():
    fwd, _ = bench.task_step("knn", "vit_micro_32", batch=2, device=torch.device("cpu"))
    ft, _ = bench.task_step("finetune", "vit_micro_32", batch=2, device=torch.device("cpu"))
    ratio = measure.count_flops(ft) / measure.count_flops(fwd)
    # backward costs about twice the forward (the patch embedding's input needs no gradient)
    assert 2.7 < ratio < 3.05


def test_mae_visible_only_encoder_needs_fewer_flops_than_mask_tokens(monkeypatch):
    tiny_head = {"head": {"depth": 1, "dim": 32, "num_heads": 2}}
    monkeypatch.setitem(pretrain_bench.BENCH_RECIPES, "mae_micro",
                        ("vit_micro_32", {"name": "mae", **tiny_head}))  # fmt: skip
    monkeypatch.setitem(pretrain_bench.BENCH_RECIPES, "mae_micro_tok",
                        ("vit_micro_32", {"name": "mae", "encoder_mode": "mask_token", **tiny_head}))  # fmt: skip
    cpu = torch.device("cpu")
    vis, _, arch = bench.pretrain_step("mae_micro", None, 2, cpu, "/tmp")
    tok, _, _ = bench.pretrain_step("mae_micro_tok", None, 2, cpu, "/tmp")
    assert arch == "vit_micro_32"
    # The encoder blocks see 1 + 4 tokens instead of 1 + 16 (16 patches, 75 % masked) and so does
    # the decoder's input projection; patch embedding, decoder blocks and loss are the same.
    # Forward + backward: 3x the forward for linear layers, 3.5x for attention (the backward
    # recomputes the scores: 5 batched products against 2).
    d, b, depth, n_tok, n_vis = 32, 2, 2, 17, 5
    linear = 2 * (3 * d * d + d * d + 2 * 2 * d * d)  # qkv, proj, mlp (ratio 2) per token
    attention = 4 * d  # q @ k^T and attn @ v, per (query, key) pair
    per_image = depth * (3 * linear * (n_tok - n_vis) + 3.5 * attention * (n_tok**2 - n_vis**2))
    per_image += 3 * 2 * d * d * (n_tok - n_vis)  # decoder_embed
    assert measure.count_flops(tok) - measure.count_flops(vis) == b * per_image


def test_measure_reports_consistent_figures():
    row = bench.measure("task/linear_probe_faithful", "vit_micro_32", batch=4, steps=1, device_name="cpu")
    assert set(bench.COLUMNS) <= set(row)
    assert row["img_per_s"] == pytest.approx(4 / row["step_s"])
    assert row["gflops_per_img"] > 0 and row["peak_mb"] > 0 and row["mfu"] is None


def test_compare_table_and_csv(tmp_path):
    rows = [
        {"target": "a", "arch": "x", "img": 32, "batch": 8, "step_s": 0.5, "img_per_s": 16.0,
         "peak_mb": 100.0, "gflops_per_img": 1.5, "mfu": None, "device": "cpu"},
        {"target": "b", "arch": "x", "img": 32, "batch": 8, "step_s": 2.0, "img_per_s": 4.0,
         "peak_mb": 90.0, "gflops_per_img": 3.0, "mfu": 0.25, "device": "H200"},
        {"target": "c", "arch": "x", "error": "RuntimeError: boom"},
    ]  # fmt: skip
    assert "ratio 4.00x" in bench.compare(rows, "a", "b")
    assert "not measured" in bench.compare(rows, "a", "c")
    text = bench.format_table(rows)
    assert "25.0%" in text and "failed: RuntimeError: boom" in text
    bench.write_csv(rows, tmp_path / "b.csv")
    with open(tmp_path / "b.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["target"] for r in got] == ["a", "b", "c"] and got[2]["error"] == "RuntimeError: boom"
    assert float(got[1]["img_per_s"]) == 4.0 and got[0]["compile_s"] == ""
    bench.write_csv([{**rows[0], "compile_s": 12.5}], tmp_path / "c.csv")
    with open(tmp_path / "c.csv") as f:
        assert float(next(csv.DictReader(f))["compile_s"]) == 12.5  # a compiled row's warm-up


def test_peak_fraction_uses_the_device_table():
    assert measure.peak_fraction(494.5e12, "NVIDIA H200") == pytest.approx(0.5)
    assert measure.peak_fraction(1e12, "Some Unknown GPU") is None


def test_unknown_target_suggests(capsys):
    assert main(["bench", "pretrain/simim"]) == 2
    assert "did you mean 'pretrain/simmim'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_cli_runs_targets_in_subprocesses_and_compares(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    rc = main(["bench", "task/knn", "task/linear_probe_faithful", "--arch", "vit_micro_32",
               "--batch", "2", "--steps", "1", "--threads", "1", "--csv", str(out),
               "--compare", "task/knn", "task/linear_probe_faithful"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "task/knn vs task/linear_probe_faithful" in text and "ratio" in text
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["target"] for r in rows] == ["task/knn", "task/linear_probe_faithful"]
    want = vit_forward_flops(img=32, patch=8, dim=32, depth=2, mlp_ratio=2.0) / 1e9
    assert float(rows[0]["gflops_per_img"]) == pytest.approx(want)


def test_a_task_that_times_its_own_pipeline_gives_the_row(monkeypatch):
    from downstream.base import PipelineBench
    from downstream.detection import Detection

    asked = []

    def timed(self, arch, iters, count_flops, **kw):
        asked.append((arch, iters, count_flops))
        return PipelineBench(input="64x64", batch_size=2, seconds_per_iter=0.5, peak_mb=123.0,
                             gflops_per_img=4.0)

    monkeypatch.setattr(Detection, "bench_pipeline", timed)
    row = bench.measure("task/detection", "vit_micro_32", batch=8, steps=3, device_name="cpu")
    assert asked == [("vit_micro_32", 4, True)]  # the timed steps and one warm-up
    assert (row["img"], row["batch"], row["step_s"], row["img_per_s"]) == ("64x64", 2, 0.5, 4.0)
    assert (row["peak_mb"], row["gflops_per_img"], row["mfu"]) == (123.0, 4.0, None)


def test_compile_targets_are_the_pretraining_targets_with_a_suffix():
    bench.check_targets(["pretrain/mae+compile", "pretrain/simmim"])
    from harness.core.errors import UserError

    with pytest.raises(UserError, match="unknown bench target 'task/finetune\\+compile'"):
        bench.check_targets(["task/finetune+compile"])
    bench.check_targets(["pretrain/mae+fsdp"])
    with pytest.raises(UserError, match="unknown bench target 'task/finetune\\+fsdp'"):
        bench.check_targets(["task/finetune+fsdp"])


@pytest.mark.slow
def test_an_fsdp_pretraining_step_on_one_process_is_sharded_and_trains(monkeypatch):
    """``+fsdp`` on one CPU process: a one-rank gloo group, every encoder block its own
    ``fully_shard`` unit, the step timed; its loss after some steps is the plain step's (FSDP
    over one rank shards nothing away: the same AdamW updates, up to float reassociation); no
    output of the sharded root is a view that needs grad (FSDP warns of those)."""
    import warnings

    import torch

    from harness.core import distributed, parallel

    recipe = ("vit_micro_32", {"name": "mae", "head": {"depth": 1, "dim": 32, "num_heads": 2}})
    monkeypatch.setitem(pretrain_bench.BENCH_RECIPES, "mae_micro", recipe)
    try:
        losses = {}
        for fsdp in (False, True):
            step, model, _, _ = pretrain_bench.recipe_step("mae_micro", "vit_micro_32", 2,
                                                           torch.device("cpu"), "", fsdp=fsdp)  # fmt: skip
            assert parallel.is_sharded(model) == fsdp
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for _ in range(3):
                    step()
            # MAE's prediction is a slice: FSDP's warning that its hook on a view can be lost
            assert not [w for w in seen if "view tensor" in str(w.message)], seen
            imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            mask = model.masker(2, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                losses[fsdp] = float(model(imgs, mask).loss)
        assert distributed.get_world_size() == 1 and distributed.is_initialized()
        assert abs(losses[True] - losses[False]) < 1e-4 * abs(losses[False]), losses
        row = bench.measure("pretrain/mae_micro+fsdp", "vit_micro_32", batch=2, steps=1,
                            device_name="cpu")  # fmt: skip
        assert row["target"] == "pretrain/mae_micro+fsdp" and row["step_s"] > 0
        assert row["gflops_per_img"] is None
    finally:
        distributed.cleanup()


@pytest.mark.slow
def test_a_compiled_pretraining_step_is_timed(monkeypatch):
    from harness.core import parallel

    monkeypatch.setattr(parallel, "COMPILE_BACKEND", "aot_eager")  # inductor takes minutes here
    monkeypatch.setitem(pretrain_bench.BENCH_RECIPES, "mae_micro",
                        ("vit_micro_32", {"name": "mae", "head": {"depth": 1, "dim": 32,
                                                                  "num_heads": 2}}))  # fmt: skip
    row = bench.measure("pretrain/mae_micro+compile", "vit_micro_32", batch=2, steps=1,
                        device_name="cpu")  # fmt: skip
    assert row["target"] == "pretrain/mae_micro+compile" and row["gflops_per_img"] is None
    assert row["compile_s"] > 0 and row["step_s"] > 0
    assert f"{row['compile_s']:.1f}" in bench.format_table([row]).splitlines()[1]  # shown


def test_the_sharded_roots_view_outputs_become_copies():
    """The forward hook :func:`~harness.core.parallel.shard_blocks` puts on the root: a view that
    requires grad is copied (same values, its own storage, still in the graph); other tensors,
    and outputs that are neither tensors nor dataclasses, pass through as they are."""
    import dataclasses

    import torch

    from harness.core.parallel import _outputs_not_views

    @dataclasses.dataclass
    class Out:
        pred: torch.Tensor
        loss: torch.Tensor
        mask: torch.Tensor
        note: str = "x"

    w = torch.randn(2, 5, 3, requires_grad=True)
    full = w * 2
    mask = torch.ones(2, 4).bool()[:, 1:]  # a view, no grad
    out = _outputs_not_views(torch.nn.Identity(), (), Out(full[:, 1:], full.sum(), mask))
    assert out.pred._base is None and torch.equal(out.pred, full[:, 1:])
    assert out.mask is mask and out.note == "x"
    out.pred.sum().backward()
    assert torch.equal(w.grad, torch.cat([torch.zeros(2, 1, 3), 2 * torch.ones(2, 4, 3)], 1))
    t = _outputs_not_views(torch.nn.Identity(), (), full[:, 1:])
    assert t._base is None
    pair = (full[:, 1:], 1)
    assert _outputs_not_views(torch.nn.Identity(), (), pair) is pair
