"""Comparing trained weights across process layouts (1 process, DDP, FSDP, accumulation)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a mimbench encoder file."""
    return torch.load(path, weights_only=True)["state_dict"]


def without_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the key third of every fused ``qkv.bias`` zeroed.

    The key bias adds ``q . b_k`` to every logit of a query's row, which the softmax cancels, so its
    true gradient is zero; what it gets is float noise, and AdamW turns noise of any size into
    lr-sized steps whose signs depend on the reduction order. Two process layouts then disagree
    there by about the lr however exact the rest is, so comparisons leave it out.
    """
    out = dict(state)
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            kept = value.clone()
            third = value.shape[0] // 3
            kept[third : 2 * third] = 0
            out[name] = kept
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over the tensors of two state dicts with the same keys,
    key biases left out (:func:`without_key_bias`)."""
    assert a.keys() == b.keys()
    a, b = without_key_bias(a), without_key_bias(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
