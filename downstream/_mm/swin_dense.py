"""Swin backbones for the dense tasks: mmdet's / mmseg's own ``SwinTransformer`` with our
timm-keyed Swin weights mapped in (pure PyTorch here; the registered classes live in
:mod:`downstream._mm.mmdet_modules` and :mod:`downstream._mm.mmseg_modules`).

Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021) is SimMIM's main encoder (Xie et al., CVPR 2022). Its dense protocols are the
OpenMMLab ones: Mask R-CNN with an FPN on the four stages (Swin's Sec. 4.2) and UperNet directly
on the four stages (Sec. 4.3). We therefore build OpenMMLab's own Swin with the architecture of
our encoder and translate the weights with the pure-PyTorch mapping of
:mod:`downstream.swin_keys` (renames; patch merging moved from the start of timm's stage ``i``
to the end of OpenMMLab's stage ``i - 1``; the merged channels reordered from timm's
concatenation to ``nn.Unfold``'s order). Checkpoint import uses the same mapping inverted for
mmpretrain's Swin, whose layout is mmdet's / mmseg's.

The relative position index buffers are rebuilt by OpenMMLab and not copied. A bias table made
for a smaller window (timm shrinks the window of a stage whose grid is smaller than it, as at
the last stage of small pretraining inputs) is resized bicubically, as Swin's Sec. 3.2 does to
fine-tune with a different window. The output norms of the earlier stages are new (ones /
zeros, as OpenMMLab's own ImageNet-initialized Swin configs have them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from downstream.swin_keys import (
    SKIPPED_SUFFIXES,
    merge_order_timm_to_mm,
    resize_bias_table,
    timm_to_mm_swin,
)
from harness.core.config import ConfigError, EncoderConfig
from harness.core.errors import CheckpointError

__all__ = [
    "MimSwinMixin",
    "merge_order_timm_to_mm",
    "mm_swin_kwargs",
    "resize_bias_table",
    "swin_stage_channels",
    "timm_to_mm_swin",
]


def mm_swin_kwargs(
    encoder: EncoderConfig, drop_path_rate: float, out_indices: Sequence[int] | None = None
) -> dict[str, Any]:
    """Constructor arguments of mmdet's / mmseg's ``SwinTransformer`` for our Swin encoder.

    Args:
        encoder: A ``family: swin`` encoder config (stages from its preset).
        drop_path_rate: Stochastic depth of the transfer run (linear over all blocks, as timm).
        out_indices: Stages returned; ``None``: all of them.

    Raises:
        ConfigError: Not a Swin encoder, or an MLP width that OpenMMLab's Swin cannot express
            (it takes an integer ``mlp_ratio``).
    """
    if encoder.family != "swin":
        raise ConfigError(f"encoder '{encoder.arch}' is a {encoder.family} encoder, not a Swin")
    kw = encoder.timm_kwargs()
    depths, heads = [int(d) for d in kw["depths"]], [int(h) for h in kw["num_heads"]]
    mlp_ratio = float(kw["mlp_ratio"])
    if mlp_ratio != int(mlp_ratio):
        raise ConfigError(
            f"encoder '{encoder.arch}' has mlp_ratio {mlp_ratio}; mmdet's / mmseg's Swin take an "
            "integer mlp_ratio: use a Swin preset with an integer mlp_ratio"
        )
    p = int(kw["patch_size"])
    return dict(
        pretrain_img_size=int(kw["img_size"]), in_channels=3, embed_dims=int(kw["embed_dim"]),
        patch_size=p, window_size=int(kw["window_size"]), mlp_ratio=int(mlp_ratio),
        depths=depths, num_heads=heads, strides=[p] + [2] * (len(depths) - 1),
        out_indices=list(range(len(depths)) if out_indices is None else out_indices),
        qkv_bias=True, patch_norm=True, drop_rate=0.0, attn_drop_rate=0.0,
        drop_path_rate=float(drop_path_rate), use_abs_pos_embed=False,
    )  # fmt: skip


def swin_stage_channels(encoder: EncoderConfig) -> list[int]:
    """Channels of the stage outputs: ``C, 2C, 4C, ...``."""
    kw = encoder.timm_kwargs()
    return [int(kw["embed_dim"]) * 2**i for i in range(len(kw["depths"]))]


class MimSwinMixin:
    """What our dense tasks add to OpenMMLab's ``SwinTransformer`` (mixed in before it).

    * ``init_checkpoint``: a mimbench Swin encoder file (or a timm Swin state dict), loaded
      weights-only and mapped by :func:`timm_to_mm_swin` in ``init_weights``; every backbone
      parameter except the new output norms must be covered, every checkpoint key used;
    * ``num_layers`` / ``layer_id`` for layer-wise lr decay (as
      :meth:`pretrain.encoders.swin.SwinEncoder.layer_id`): 0 = patch embedding, then the blocks numbered
      across stages from 1, a patch merging joining the first block of the stage it feeds
      (timm's placement), ``num_layers + 1`` = the output norms.

    Args:
        init_checkpoint: Encoder file; ``None``: OpenMMLab's random initialization.
        **kwargs: ``SwinTransformer`` arguments (see :func:`mm_swin_kwargs`).
    """

    def __init__(self, init_checkpoint: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.init_checkpoint = init_checkpoint
        depths = list(kwargs.get("depths", ()))
        self._mim_window = int(kwargs["window_size"])
        self._mim_offsets = [0]
        for d in depths:
            self._mim_offsets.append(self._mim_offsets[-1] + int(d))

    @property
    def num_layers(self) -> int:
        """Swin blocks over all stages."""
        return self._mim_offsets[-1]

    def layer_id(self, name: str) -> int:
        """LLRD group of a parameter named relative to this backbone (see the class docstring)."""
        parts = name.split(".")
        if parts[0] in ("patch_embed", "absolute_pos_embed"):
            return 0
        if parts[0] == "stages":
            stage = int(parts[1])
            if parts[2] == "blocks":
                return self._mim_offsets[stage] + int(parts[3]) + 1
            if parts[2] == "downsample":  # feeds stage + 1 (timm: layers.{stage+1}.downsample)
                return self._mim_offsets[stage + 1] + 1
        return self.num_layers + 1

    def init_weights(self) -> None:
        """Map ``init_checkpoint`` in, or fall back to OpenMMLab's random initialization."""
        if not self.init_checkpoint:
            super().init_weights()  # type: ignore[misc]
            return
        from .vit_dense import read_state_dict

        path = str(self.init_checkpoint)
        num_stages = len(self.stages)  # type: ignore[attr-defined]
        mapped = timm_to_mm_swin(read_state_dict(path), num_stages, self._mim_window, path)
        own = self.state_dict()  # type: ignore[attr-defined]
        new_ok = tuple(f"norm{i}." for i in self.out_indices)  # type: ignore[attr-defined]
        missing = sorted(
            k for k in own if k not in mapped and not k.endswith(SKIPPED_SUFFIXES)
            and not k.startswith(new_ok)
        )  # fmt: skip
        unexpected = sorted(set(mapped) - set(own))
        bad = sorted(k for k in set(mapped) & set(own) if mapped[k].shape != own[k].shape)
        if missing or unexpected or bad:
            raise CheckpointError(
                f"encoder weights {path} do not fit the Swin backbone built from the encoder "
                f"config: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches "
                f"{[(k, tuple(mapped[k].shape), tuple(own[k].shape)) for k in bad[:3]]}; "
                "the task's encoder config must be the one the weights were saved with"
            )
        self.load_state_dict(mapped, strict=False)  # type: ignore[attr-defined]
