"""``mimbench plan --estimate``: steps and device-hours against a hand computation on a tiny
suite with a given bench table; stages without a step time are listed, never counted as free."""

from __future__ import annotations

import pytest
import yaml

from harness.core.config import validate_config
from harness.estimate import (
    SHIPPED_TABLE,
    EstimateError,
    estimate,
    pretrain_steps,
    read_bench_table,
    stage_costs,
)
from harness.stages import plan_stages

BENCH = """target,arch,img,batch,step_s,img_per_s,peak_mb,gflops_per_img,mfu,device,error
pretrain/simmim,vit_micro_32,32,8,0.4,20,1,0.1,,GPU X,
task/linear_probe,vit_micro_32,32,16,0.32,50,1,0.1,,GPU X,
pretrain/mae,vit_micro_32,32,8,,,,,,GPU X,boom
"""


def _suite(out, seeds=(0, 1), tasks=("linear_probe",)):
    return {
        "kind": "suite", "name": "est", "output_dir": str(out), "seeds": list(seeds),
        "data": {"source": str(out / "no-data-here")},
        "encoders": [
            {"name": "sim", "encoder": {"arch": "vit_micro_32"},
             "pretrain": {"recipe": {"name": "simmim", "masking": {"mask_patch_size": 8}},
                          "train": {"epochs": 3, "warmup_epochs": 0, "batch_size": 8}}},
            {"name": "random-init", "encoder": {"arch": "vit_micro_32"}},
        ],
        "tasks": [{"name": t} for t in tasks],
    }


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text(BENCH)
    return path


def test_steps_are_epochs_times_full_batches():
    assert pretrain_steps(3, 100, 8) == 36  # 3 x floor(100 / 8)
    assert pretrain_steps(3, 100, 8, max_steps=10) == 10


def test_costs_and_total_match_a_hand_computation(tmp_path, bench):
    cfg = validate_config(_suite(tmp_path))
    table = read_bench_table(bench)
    assert set(table) == {("pretrain/simmim", "vit_micro_32"), ("task/linear_probe", "vit_micro_32")}
    costs = stage_costs([plan_stages(cfg)], table, n_train=100, n_val=20)
    by = {(c.kind, c.encoder, c.seed): c for c in costs}
    assert len(costs) == 2 * 3  # per seed: one pretraining, two probes
    pre = by[("pretrain", "sim", 0)]
    # 3 epochs x floor(100 / 8) = 36 steps of 8 images, 0.4 s per step of 8 = 0.05 s per image
    assert (pre.steps, pre.images) == (36, 288) and pre.seconds == pytest.approx(36 * 0.4)
    probe = by[("linear_probe", "random-init", 1)]
    # features of 100 train + 20 val images, 0.32 s per 16 images = 0.02 s per image
    assert probe.images == 120 and probe.seconds == pytest.approx(120 * 0.02)
    total_s = 2 * (36 * 0.4 + 2 * 120 * 0.02)
    text = estimate(cfg, bench, n_train=100, n_val=20)
    assert f"total: {total_s / 3600:.3g} device-hours over 6 of 6 stage(s)" in text
    assert "NOT ESTIMATED" not in text and "(estimate)" not in text


def test_a_stage_without_a_step_time_is_reported_not_counted(tmp_path, bench):
    raw = _suite(tmp_path, seeds=(0,))
    raw["encoders"][0]["pretrain"]["recipe"]["name"] = "mae"  # its bench row failed: skipped
    cfg = validate_config(raw)
    costs = stage_costs([plan_stages(cfg)], read_bench_table(bench), 100, 20)
    missing = [c for c in costs if c.seconds is None]
    assert [(c.kind, c.target) for c in missing] == [("pretrain", "pretrain/mae")]
    assert missing[0].why_not == "no step time for pretrain/mae at vit_micro_32 in the bench table"
    text = estimate(cfg, bench, n_train=100, n_val=20)
    assert f"total: {2 * 120 * 0.02 / 3600:.3g} device-hours over 2 of 3 stage(s)" in text
    assert "NOT ESTIMATED (1 stage(s), not in the total):" in text
    assert "pretrain sim seed 0: no step time for pretrain/mae" in text


def test_a_task_without_a_cost_rule_is_reported(tmp_path, bench):
    cfg = validate_config(_suite(tmp_path, seeds=(0,), tasks=("linear_probe", "detection")))
    costs = stage_costs([plan_stages(cfg)], read_bench_table(bench), 100, 20)
    det = [c for c in costs if c.kind == "detection"]
    assert len(det) == 2 and all(c.seconds is None and c.images is None for c in det)
    assert det[0].why_not == "task 'detection' has no cost rule (Task.bench_images)"


def test_bad_tables_and_unknown_data_sizes_are_clear_errors(tmp_path, bench):
    with pytest.raises(EstimateError, match="not found: write one with `mimbench bench --csv"):
        read_bench_table(tmp_path / "none.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(EstimateError, match="not a `mimbench bench --csv` table"):
        read_bench_table(tmp_path / "x.csv")
    two = BENCH + "task/linear_probe,vit_micro_32,32,16,0.1,1,1,1,,GPU Y,\n"
    (tmp_path / "two.csv").write_text(two)
    with pytest.raises(EstimateError, match="several devices .* pick one with --gpu"):
        read_bench_table(tmp_path / "two.csv")
    assert read_bench_table(tmp_path / "two.csv", gpu="gpu y")[
        ("task/linear_probe", "vit_micro_32")].s_per_img == pytest.approx(0.1 / 16)
    cfg = validate_config(_suite(tmp_path))
    with pytest.raises(EstimateError, match="--train-images N --val-images M"):
        estimate(cfg, bench)


def test_the_shipped_table_is_marked_as_estimates():
    table = read_bench_table(SHIPPED_TABLE, gpu="H100")
    assert table and all(r.estimate and "MFU 0.4, assumed" in r.estimate for r in table.values())
    assert all(r.device == "H100 (estimate)" for r in table.values())
    a100 = read_bench_table(SHIPPED_TABLE, gpu="A100")
    key = ("pretrain/mae", "vit_large_16")
    # the same counted FLOPs over the two peaks: 989 / 312 TFLOP/s
    assert a100[key].s_per_img / table[key].s_per_img == pytest.approx(989 / 312, rel=1e-4)


def test_plan_estimate_cli(tmp_path, bench, capsys):
    from harness.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_suite(tmp_path)))
    assert main(["plan", str(path), "--estimate", "--bench-table", str(bench),
                 "--train-images", "100", "--val-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "100 train / 20 val images" in out and "device-hours over 6 of 6 stage(s)" in out


def test_each_tasks_images_per_run_by_hand():
    from downstream.base import get_task
    from downstream.finetune import FinetuneConfig
    from downstream.knn import KNNConfig
    from downstream.linear_probe import LinearProbeConfig
    from downstream.linear_probe_faithful import LinearProbeFaithfulConfig
    from harness.core.config import EncoderConfig

    base, large = EncoderConfig(arch="vit_base_16"), EncoderConfig(arch="vit_large_16")
    n, v = 1000, 50
    assert get_task("linear_probe").bench_images(LinearProbeConfig(train_views=3), base, n, v) \
        == 3 * 1000 + 50
    assert get_task("knn").bench_images(KNNConfig(), base, n, v) == 1050
    faithful = LinearProbeFaithfulConfig(epochs=4, batch_size=300)
    assert get_task("linear_probe_faithful").bench_images(faithful, base, n, v) == 4 * 3 * 300
    ft = get_task("finetune")
    assert ft.bench_images(FinetuneConfig(epochs=7, batch_size=64), base, n, v) == 7 * 15 * 64
    # epochs unset: MAE's schedule for the depth (ViT-B 100 epochs, ViT-L 50)
    from downstream.finetune import PAPER_SETTINGS

    for enc, size in ((base, "base"), (large, "large")):
        want = PAPER_SETTINGS[size]["epochs"] * (n // 64) * 64
        assert ft.bench_images(FinetuneConfig(batch_size=64), enc, n, v) == want
