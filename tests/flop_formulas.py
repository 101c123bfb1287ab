"""Hand-written FLOP counts that the benchmark tests check torch's flop counter against."""

from __future__ import annotations


def vit_forward_flops(
    img: int, patch: int, dim: int, depth: int, mlp_ratio: float, cls_token: bool = True
) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of a ViT's forward pass with global attention in
    every block; ``cls_token=False`` for the dense backbones, which keep patch tokens only."""
    tokens = (img // patch) ** 2
    n = tokens + int(cls_token)
    hidden = int(dim * mlp_ratio)
    embed = 2 * tokens * (3 * patch * patch) * dim
    block = (
        2 * n * dim * 3 * dim  # qkv
        + 2 * n * n * dim  # q @ k^T over all heads
        + 2 * n * n * dim  # attn @ v
        + 2 * n * dim * dim  # proj
        + 2 * n * dim * hidden * 2  # mlp fc1 + fc2
    )
    return embed + depth * block
