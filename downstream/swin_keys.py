"""Swin weights between timm 1.0's layout (our encoders) and OpenMMLab's (mmdet, mmseg and
mmpretrain share one ``SwinTransformer`` layout), in both directions. Pure PyTorch: no mmcv /
mmdet / mmseg / mmpretrain import, so that checkpoint import can use it.

===============================================  ==================================================
timm 1.0 (our checkpoints)                       OpenMMLab (mmdet / mmseg / mmpretrain)
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
  none in stage 0), OpenMMLab at the *end* of stage ``i - 1``. The features after the last block
  of each stage are the same.
* The channel order of the merged 2 x 2 neighbourhood: timm concatenates the four tokens
  neighbour-major in the order (row, col) = (0, 0), (1, 0), (0, 1), (1, 1), i.e. channel
  ``(2 * col + row) * C + c``; OpenMMLab's ``PatchMerging`` (mmcv's, used by mmpretrain, and
  mmdet's / mmseg's copies of it) unfolds with ``nn.Unfold``, channel-major with the neighbour
  in row-major order, i.e. channel ``4 * c + 2 * row + col``. The merge's LayerNorm (over the
  ``4C`` concatenation) and the input columns of its reduction are permuted accordingly.

Index / mask buffers (``relative_position_index``, ``attn_mask``) are rebuilt by both sides and
never mapped. OpenMMLab's output norms of the earlier stages (``norm0`` ... for
``out_indices`` beyond the last stage) have no timm counterpart.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from harness.core.errors import CheckpointError

# (timm name, OpenMMLab name) inside a block, used in both directions
BLOCK_RENAMES: tuple[tuple[str, str], ...] = (
    ("attn.qkv.", "attn.w_msa.qkv."),
    ("attn.proj.", "attn.w_msa.proj."),
    ("attn.relative_position_bias_table", "attn.w_msa.relative_position_bias_table"),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
)
# buffers that both sides rebuild from the architecture
SKIPPED_SUFFIXES: tuple[str, ...] = ("relative_position_index", "attn_mask")
BUFFER_REASON = "index / mask buffer (rebuilt)"
EARLY_NORM_REASON = "output norm of an earlier stage (timm's Swin has none)"


# --------------------------------------------------------------------------- tensors


def merge_order_timm_to_mm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder the ``4C`` merged channels along ``dim`` from timm's to OpenMMLab's order.

    timm channel ``(2 * col + row) * C + c`` becomes OpenMMLab channel ``4 * c + 2 * row + col``.
    """
    x = x.movedim(dim, -1)
    c = x.shape[-1] // 4
    y = x.reshape(*x.shape[:-1], 2, 2, c)  # [..., col, row, C]
    y = y.permute(*range(y.ndim - 3), -1, -2, -3)  # [..., C, row, col]
    return y.reshape(*x.shape).movedim(-1, dim)


def merge_order_mm_to_timm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`merge_order_timm_to_mm`: OpenMMLab channel ``4 * c + 2 * row + col``
    becomes timm channel ``(2 * col + row) * C + c``."""
    x = x.movedim(dim, -1)
    c = x.shape[-1] // 4
    y = x.reshape(*x.shape[:-1], c, 2, 2)  # [..., C, row, col]
    y = y.permute(*range(y.ndim - 3), -1, -2, -3)  # [..., col, row, C]
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


# --------------------------------------------------------------------------- keys


def _rename_block(rest: str, to_mm: bool) -> str | None:
    for timm_name, mm_name in BLOCK_RENAMES:
        src, dst = (timm_name, mm_name) if to_mm else (mm_name, timm_name)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def swin_key_timm_to_mm(key: str, num_stages: int) -> tuple[str, bool] | None:
    """OpenMMLab's name for timm Swin key ``key``: ``(name, merged)`` where ``merged`` says that
    the tensor's last dimension holds merged channels (reorder with
    :func:`merge_order_timm_to_mm`); ``None`` for a key outside the mapping (buffers included)."""
    parts = key.split(".")
    if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in ("proj", "norm"):
        module = "projection" if parts[1] == "proj" else "norm"
        return ".".join(["patch_embed", module, *parts[2:]]), False
    if parts[0] == "norm" and len(parts) == 2:
        return f"norm{num_stages - 1}.{parts[1]}", False
    if parts[0] != "layers" or len(parts) < 4 or not parts[1].isdigit():
        return None
    stage = int(parts[1])
    if parts[2] == "downsample":
        if stage == 0 or stage >= num_stages or parts[3] not in ("norm", "reduction"):
            return None
        return f"stages.{stage - 1}.downsample.{'.'.join(parts[3:])}", True
    if parts[2] == "blocks" and len(parts) > 4:
        mapped = _rename_block(".".join(parts[4:]), to_mm=True)
        if mapped is not None:
            return f"stages.{stage}.blocks.{parts[3]}.{mapped}", False
    return None


def swin_key_mm_to_timm(key: str, num_stages: int) -> tuple[str, bool] | None:
    """timm's name for OpenMMLab Swin key ``key`` (the inverse of :func:`swin_key_timm_to_mm`):
    ``(name, merged)``, ``merged`` meaning reorder with :func:`merge_order_mm_to_timm`; ``None``
    for a key outside the mapping (buffers, output norms of earlier stages included).

    mmpretrain's Swin files before its state-dict version 2 name the last output norm ``norm``;
    that maps too.
    """
    parts = key.split(".")
    if parts[0] == "patch_embed" and len(parts) > 2 and parts[1] in ("projection", "norm"):
        module = "proj" if parts[1] == "projection" else "norm"
        return ".".join(["patch_embed", module, *parts[2:]]), False
    if len(parts) == 2 and parts[0] in ("norm", f"norm{num_stages - 1}"):
        return f"norm.{parts[1]}", False
    if parts[0] != "stages" or len(parts) < 4 or not parts[1].isdigit():
        return None
    stage = int(parts[1])
    if parts[2] == "downsample":
        if stage >= num_stages - 1 or parts[3] not in ("norm", "reduction"):
            return None
        return f"layers.{stage + 1}.downsample.{'.'.join(parts[3:])}", True
    if parts[2] == "blocks" and len(parts) > 4:
        mapped = _rename_block(".".join(parts[4:]), to_mm=False)
        if mapped is not None:
            return f"layers.{stage}.blocks.{parts[3]}.{mapped}", False
    return None


def mm_num_stages(state: dict[str, torch.Tensor]) -> int:
    """Stages of an OpenMMLab-keyed Swin state dict (``stages.N.*``; 0 if none)."""
    found = [int(m.group(1)) for k in state if (m := re.match(r"stages\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


# --------------------------------------------------------------------------- state dicts


def timm_to_mm_swin(
    state: dict[str, torch.Tensor], num_stages: int, window_size: int, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Translate a timm 1.0 Swin state dict into OpenMMLab's Swin key names.

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
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        mapped = swin_key_timm_to_mm(key, num_stages)
        if mapped is None:
            unknown.append(key)
            continue
        name, merged = mapped
        if merged:  # norm: [4C]; reduction: [2C, 4C]; both index the merged channels last
            v = merge_order_timm_to_mm(v, dim=-1)
        elif name.endswith("relative_position_bias_table"):
            v = resize_bias_table(v, window_size)
        out[name] = v
    if unknown:
        raise CheckpointError(
            f"{source}: keys {unknown[:5]} are not part of a timm Swin backbone (a classifier "
            "head, or another family's weights?): save the encoder with mimbench (or import it "
            "with `mimbench import`) so that it holds the Swin's timm keys only"
        )
    return out


def mm_to_timm_swin(
    state: dict[str, torch.Tensor], num_stages: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], list[str]]:
    """Translate an OpenMMLab Swin backbone state dict (keys relative to the backbone) into
    timm 1.0's key names, the inverse of :func:`timm_to_mm_swin` (bias tables keep their size:
    the target resizes them to its windows).

    Args:
        state: OpenMMLab keys (``patch_embed.*``, ``stages.*``, ``norm{i}.*``).
        num_stages: Stages of the model; ``None``: read from the ``stages.N`` keys.

    Returns:
        ``(timm state, dropped keys by reason, unknown keys)``: buffers and earlier stages' output
        norms are dropped; keys outside the mapping are left to the caller.
    """
    n = mm_num_stages(state) if num_stages is None else num_stages
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, v in state.items():
        if key.endswith(SKIPPED_SUFFIXES):
            dropped.setdefault(BUFFER_REASON, []).append(key)
            continue
        mapped = swin_key_mm_to_timm(key, n)
        if mapped is None:
            m = re.fullmatch(r"norm(\d+)\.\w+", key)
            if m and int(m.group(1)) < n - 1:
                dropped.setdefault(EARLY_NORM_REASON, []).append(key)
            else:
                unknown.append(key)
            continue
        name, merged = mapped
        out[name] = merge_order_mm_to_timm(v, dim=-1) if merged else v
    return out, dropped, unknown
