"""FLOPs per image of the dense tasks' bench (one counted training iteration)."""

from __future__ import annotations

import pytest


def dense_vit_forward_flops(img: int, patch: int, dim: int, depth: int, mlp_ratio: float) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of a dense ViT's forward pass: patch tokens
    only (the class token is dropped), global attention in every block."""
    n = (img // patch) ** 2
    hidden = int(dim * mlp_ratio)
    embed = 2 * n * (3 * patch * patch) * dim
    block = (
        2 * n * dim * 3 * dim  # qkv
        + 2 * n * n * dim  # q @ k^T over all heads
        + 2 * n * n * dim  # attn @ v
        + 2 * n * dim * dim  # proj
        + 2 * n * dim * hidden * 2  # mlp fc1 + fc2
    )
    return embed + depth * block


@pytest.mark.mm
@pytest.mark.slow
def test_segmentation_bench_counts_at_least_the_backbone_forward():
    from downstream._mm.bench import bench

    res = bench("segmentation", arch="vit_micro_32", iters=2, size=64, count_flops=True)
    assert res["batch_size"] == 2 and res["iters"] == 2
    backbone = dense_vit_forward_flops(img=64, patch=8, dim=32, depth=2, mlp_ratio=2.0)
    gflops = res["gflops_per_img"]
    assert gflops is not None and gflops * 1e9 >= backbone > 0
    assert bench("segmentation", arch="vit_micro_32", iters=2, size=64)["gflops_per_img"] is None
