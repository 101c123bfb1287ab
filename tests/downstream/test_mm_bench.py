"""FLOPs per image of the dense tasks' bench (one counted training iteration)."""

from __future__ import annotations

import pytest
from flop_formulas import vit_forward_flops


@pytest.mark.mm
@pytest.mark.slow
def test_segmentation_bench_counts_at_least_the_backbone_forward():
    from downstream._mm.bench import bench

    res = bench("segmentation", arch="vit_micro_32", iters=2, size=64, count_flops=True)
    assert res["batch_size"] == 2 and res["iters"] == 2
    backbone = vit_forward_flops(img=64, patch=8, dim=32, depth=2, mlp_ratio=2.0, cls_token=False)
    gflops = res["gflops_per_img"]
    assert gflops is not None and gflops * 1e9 >= backbone > 0
    assert bench("segmentation", arch="vit_micro_32", iters=2, size=64)["gflops_per_img"] is None
