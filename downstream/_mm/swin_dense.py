"""Swin backbones for the dense tasks: mmdet's / mmseg's own ``SwinTransformer`` with our
timm-keyed Swin weights mapped in (pure PyTorch here; the registered classes live in
:mod:`downstream._mm.mmdet_modules` and :mod:`downstream._mm.mmseg_modules`).

Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021) is SimMIM's main encoder (Xie et al., CVPR 2022). Its dense protocols are the
OpenMMLab ones: Mask R-CNN with an FPN on the four stages (Swin's Sec. 4.2) and UperNet directly
on the four stages (Sec. 4.3). We therefore build OpenMMLab's own Swin with the architecture of
our encoder and translate the weights:

===============================================  ==================================================
timm 1.0 (our checkpoints)                       mmdet / mmseg
===============================================  ==================================================
``patch_embed.proj`` / ``patch_embed.norm``      ``patch_embed.projection`` / ``patch_embed.norm``
``layers.i.blocks.j.norm1`` / ``norm2``          ``stages.i.blocks.j.norm1`` / ``norm2``
``layers.i.blocks.j.attn.{qkv,proj}``            ``stages.i.blocks.j.attn.w_msa.{qkv,proj}``
``...attn.relative_position_bias_table``         ``...attn.w_msa.relative_position_bias_table``
``layers.i.blocks.j.mlp.fc1`` / ``fc2``          ``stages.i.blocks.j.ffn.layers.0.0`` / ``layers.1``
``layers.i.downsample.{norm,reduction}`` (i>0)   ``stages.(i-1).downsample.{norm,reduction}``
``norm`` (after the last stage)                  ``norm{last}`` (the last stage's output norm)
===============================================  ==================================================

Two differences need more than a rename:

* Where patch merging sits: timm 1.0 merges at the *start* of stage ``i`` (``layers.i.downsample``,
  none in stage 0), OpenMMLab at the *end* of stage ``i - 1``. The stage outputs differ
  accordingly; the features a dense head reads (the last block of each stage) are the same.
* The channel order of the merged 2 x 2 neighbourhood: timm concatenates the four tokens
  neighbour-major in the order (row, col) = (0, 0), (1, 0), (0, 1), (1, 1), i.e. channel
  ``(2 * col + row) * C + c``; OpenMMLab unfolds with ``nn.Unfold``, channel-major with the
  neighbour in row-major order, i.e. channel ``4 * c + 2 * row + col``. The merge's LayerNorm
  (over the ``4C`` concatenation) and the input columns of its reduction are permuted to match.

The relative position index buffers are rebuilt by OpenMMLab and not copied. A bias table made
for a smaller window (timm shrinks the window of a stage whose grid is smaller than it, as at
the last stage of small pretraining inputs) is resized bicubically, as Swin's Sec. 3.2 does to
fine-tune with a different window. The output norms of the earlier stages are new (ones /
zeros, as OpenMMLab's own ImageNet-initialized Swin configs have them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from harness.config import ConfigError, EncoderConfig
from harness.errors import CheckpointError

_BLOCK_RENAMES = (
    ("attn.qkv.", "attn.w_msa.qkv."),
    ("attn.proj.", "attn.w_msa.proj."),
    ("attn.relative_position_bias_table", "attn.w_msa.relative_position_bias_table"),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
)
# buffers that both sides rebuild from the architecture
_SKIPPED_SUFFIXES = ("relative_position_index", "attn_mask")


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


def merge_order_timm_to_mm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder the ``4C`` merged channels along ``dim`` from timm's to OpenMMLab's order.

    timm channel ``(2 * col + row) * C + c`` becomes OpenMMLab channel ``4 * c + 2 * row + col``.
    """
    x = x.movedim(dim, -1)
    c = x.shape[-1] // 4
    y = x.reshape(*x.shape[:-1], 2, 2, c)  # [..., col, row, C]
    y = y.permute(*range(y.ndim - 3), -1, -2, -3)  # [..., C, row, col]
    return y.reshape(*x.shape).movedim(-1, dim)


def resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A relative position bias table ``[(2w' - 1)^2, heads]`` resized bicubically to window
    ``window`` (Swin, Sec. 3.2)."""
    side = round(table.shape[0] ** 0.5)
    new = 2 * window - 1
    if side == new:
        return table
    grid = table.t().reshape(1, table.shape[1], side, side)  # [1, heads, s, s]
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], new * new).t().contiguous()


def timm_to_mm_swin(
    state: dict[str, torch.Tensor], num_stages: int, window_size: int, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Translate a timm 1.0 Swin state dict into mmdet's / mmseg's Swin key names.

    Args:
        state: timm keys (``patch_embed.*``, ``layers.*``, ``norm.*``); no classifier.
        num_stages: Stages of the target model.
        window_size: Window of the target model (bias tables of other windows are resized).
        source: Named in errors.

    Returns:
        The mapped tensors (without the index buffers, which the target builds itself).

    Raises:
        CheckpointError: A key this mapping does not know (a classifier head, another family).
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, v in state.items():
        parts = key.split(".")
        if key.endswith(_SKIPPED_SUFFIXES):
            continue
        if parts[0] == "patch_embed" and parts[1] in ("proj", "norm"):
            module = "projection" if parts[1] == "proj" else "norm"
            out[".".join(["patch_embed", module, *parts[2:]])] = v
        elif parts[0] == "norm":
            out[f"norm{num_stages - 1}.{parts[1]}"] = v
        elif parts[0] == "layers" and len(parts) > 3 and parts[2] == "downsample":
            stage = int(parts[1])
            if stage == 0 or stage >= num_stages or parts[3] not in ("norm", "reduction"):
                unknown.append(key)
                continue
            # norm: [4C]; reduction: [2C, 4C]; both indexed by the merged channels last
            out[f"stages.{stage - 1}.downsample.{'.'.join(parts[3:])}"] = merge_order_timm_to_mm(
                v, dim=-1
            )
        elif parts[0] == "layers" and len(parts) > 4 and parts[2] == "blocks":
            rest = ".".join(parts[4:])
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    mapped = new + rest[len(old) :]
                    if mapped.endswith("relative_position_bias_table"):
                        v = resize_bias_table(v, window_size)
                    out[f"stages.{parts[1]}.blocks.{parts[3]}.{mapped}"] = v
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: keys {unknown[:5]} are not part of a timm Swin backbone (a classifier "
            "head, or another family's weights?): save the encoder with mimbench (or import it "
            "with `mimbench import`) so that it holds the Swin's timm keys only"
        )
    return out


class MimSwinMixin:
    """What our dense tasks add to OpenMMLab's ``SwinTransformer`` (mixed in before it).

    * ``init_checkpoint``: a mimbench Swin encoder file (or a timm Swin state dict), loaded
      weights-only and mapped by :func:`timm_to_mm_swin` in ``init_weights``; every backbone
      parameter except the new output norms must be covered, every checkpoint key used;
    * ``num_layers`` / ``layer_id`` for layer-wise lr decay (as
      :meth:`pretrain.swin.SwinEncoder.layer_id`): 0 = patch embedding, then the blocks numbered
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
            k for k in own if k not in mapped and not k.endswith(_SKIPPED_SUFFIXES)
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
