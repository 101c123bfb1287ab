"""Dense-prediction backbones and necks on our plain ViT encoder (pure PyTorch, no mm imports).

:class:`DenseViT` runs the timm blocks of a :class:`~pretrain.encoder.ViTEncoder` on the 2-D
token grid of an input of any size (a multiple of the patch size after padding):

* the absolute position embedding is interpolated (bicubic) from the pretraining grid to the
  input's grid, as MAE and ViTDet do when fine-tuning at a higher resolution;
* window attention (ViTDet, Li et al., "Exploring Plain Vision Transformer Backbones for Object
  Detection", ECCV 2022, Sec. 3): most blocks attend within non-overlapping windows, a few
  evenly spaced blocks attend globally. The tokens are partitioned into windows around the
  attention call of the unchanged timm block, so parameter names stay timm's and pretrained
  checkpoints load as they are;
* optional decomposed relative position embeddings (MViTv2, used by ViTDet), zero-initialized
  and learned during transfer only, as MAE turns on relative position for detection and
  segmentation (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, A.3/A.4);
* the class token is dropped (ViTDet).

:class:`SimpleFeaturePyramid` is ViTDet's simple feature pyramid (strides 4-32 from the last
block by deconvolution / identity / max pooling, plus stride 64 by subsampling);
:class:`MultiLevelNeck` is the multi-level head of BEiT (Bao et al., ICLR 2022) and MAE for
UperNet: four blocks' maps turned into strides 4, 8, 16, 32 by two deconvolutions, one
deconvolution, identity and max pooling. Both derive the number of (de)convolutions from the
encoder's patch size, so a 16 px patch gives the papers' layout and a tiny 8 px patch encoder
still yields strides 4-32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoder import ViTEncoder


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``[B, C, H, W]`` maps (ViTDet's norm in necks and heads)."""

    _abbr_ = "ln"  # the name mmcv's build_norm_layer gives the module

    def __init__(self, num_channels: int, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(num_channels, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # [B, C, H, W]


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``[B, H, W, C]`` into windows ``[B * nW, ws, ws, C]``, zero-padding H and W up to
    multiples of ``ws`` (bottom / right). Returns the windows and the padded size."""
    b, h, w, c = x.shape
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, ws: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, ws, ws, C] -> [B, H, W, C]``."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, :h, :w].contiguous()


class DecomposedRelPos(nn.Module):
    """Decomposed relative position embeddings (MViTv2 / ViTDet): one table per axis.

    The attention logit of query ``(i, j)`` and key ``(k, l)`` gets
    ``q . R_h[i - k] + q . R_w[j - l]``. Tables are zero-initialized and linearly resized when
    the grid differs from the one they were made for.

    Args:
        size: Grid side the tables are made for (window size, or the global grid).
        head_dim: Channels per head.
    """

    def __init__(self, size: int, head_dim: int) -> None:
        super().__init__()
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    @staticmethod
    def _table(n: int, rel: torch.Tensor) -> torch.Tensor:
        """``[n, n, C]``: the embedding of offset ``i - k`` for every query ``i`` and key ``k``."""
        if rel.shape[0] != 2 * n - 1:
            rel = F.interpolate(rel.t()[None], size=2 * n - 1, mode="linear", align_corners=False)
            rel = rel[0].t()  # [2n - 1, C]
        idx = torch.arange(n, device=rel.device)
        return rel[idx[:, None] - idx[None, :] + n - 1]

    def forward(self, attn: torch.Tensor, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Add the relative logits.

        Args:
            attn: Logits ``[b, heads, N, N]`` with ``N = h * w``.
            q: Unscaled queries ``[b, heads, N, C]``.
            hw: The grid ``(h, w)``.
        """
        h, w = hw
        b, nh, n, c = q.shape
        rq = q.reshape(b * nh, h, w, c)
        rel_h = torch.einsum("bhwc,hkc->bhwk", rq, self._table(h, self.rel_pos_h))  # [bn, h, w, h]
        rel_w = torch.einsum("bhwc,wkc->bhwk", rq, self._table(w, self.rel_pos_w))  # [bn, h, w, w]
        attn = attn.reshape(b * nh, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
        return attn.reshape(b, nh, n, n)


def attention(attn: nn.Module, x: torch.Tensor, rel_pos: DecomposedRelPos | None) -> torch.Tensor:
    """Self-attention of a timm ``Attention`` module on a token grid ``[b, h, w, D]``.

    Without ``rel_pos`` the timm module runs as it is; with it, the same weights are used with
    relative position logits added before the softmax.
    """
    b, h, w, d = x.shape
    n = h * w
    if rel_pos is None:
        return attn(x.reshape(b, n, d)).reshape(b, h, w, -1)
    if getattr(attn, "gate", None) is not None:
        raise ValueError("relative position embeddings do not support gated attention")
    qkv = attn.qkv(x.reshape(b, n, d)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, N, C]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [b, heads, N, N]
    logits = rel_pos(logits, q, (h, w))
    y = attn.attn_drop(logits.softmax(dim=-1)) @ v  # [b, heads, N, C]
    y = y.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    y = attn.proj_drop(attn.proj(attn.norm(y)))
    return y.reshape(b, h, w, -1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an encoder file (``{'state_dict': ...}``) or a bare one, loaded
    weights-only.

    Raises:
        CheckpointError: The file cannot be loaded weights-only, or holds no state dict.
    """

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot load encoder weights {path} weights-only ({type(exc).__name__}: {exc})"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return state


def default_global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks: four evenly spaced, ending at the last (ViT-B: 2, 5, 8, 11)."""
    return sorted({max(0, (k + 1) * depth // 4 - 1) for k in range(4)})


def default_out_indices(depth: int) -> list[int]:
    """BEiT / MAE UperNet levels (0-based): ViT-B 3, 5, 7, 11 (blocks 4, 6, 8, 12); ViT-L
    7, 11, 15, 23."""
    return [max(0, depth // 3 - 1), max(0, depth // 2 - 1), max(0, 2 * depth // 3 - 1), depth - 1]


class DenseViT(nn.Module):
    """Our ViT encoder as a dense backbone returning ``[B, D, H/p, W/p]`` maps.

    Args:
        encoder: :class:`~harness.core.config.EncoderConfig` fields (the pretraining architecture).
        out_indices: Blocks (0-based, negatives count from the end) whose outputs are returned.
        img_size: Training input side, for the size of the global blocks' relative tables.
        window_size: Window side in tokens; 0 means global attention everywhere.
        global_blocks: Blocks with global attention when ``window_size > 0``;
            ``None`` gives :func:`default_global_blocks`.
        rel_pos: Add decomposed relative position embeddings (zero-initialized).
        drop_path_rate: Stochastic depth, linearly increasing over blocks (timm's rule).
        init_checkpoint: A mimbench encoder file or timm state dict loaded (weights-only) by
            :meth:`init_weights`; ``None`` keeps the random initialization.
    """

    def __init__(
        self,
        encoder: dict[str, Any],
        out_indices: Sequence[int] = (-1,),
        img_size: int = 1024,
        window_size: int = 0,
        global_blocks: Sequence[int] | None = None,
        rel_pos: bool = False,
        drop_path_rate: float = 0.0,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()

        cfg = EncoderConfig.model_validate({**encoder, "drop_path_rate": drop_path_rate})
        self.encoder = ViTEncoder(cfg)
        self.init_checkpoint = init_checkpoint
        depth = self.encoder.num_layers
        self.out_indices = [i % depth for i in out_indices]  # order kept, repeats allowed
        self.window_size = int(window_size)
        glob = (
            default_global_blocks(depth)
            if global_blocks is None
            else [g % depth for g in global_blocks]
        )
        self.windowed = {i for i in range(depth) if self.window_size > 0 and i not in glob}
        p = self.encoder.patch_size
        head_dim = self.encoder.embed_dim // self.encoder.vit.blocks[0].attn.num_heads
        self.rel_pos = (
            nn.ModuleList(
                DecomposedRelPos(
                    self.window_size if i in self.windowed else img_size // p, head_dim
                )
                for i in range(depth)
            )
            if rel_pos
            else None
        )
        vit = self.encoder.vit
        for prm in (vit.cls_token, self.encoder.mask_token, *vit.norm.parameters()):
            prm.requires_grad_(False)  # unused by dense heads: the class token is dropped
        vit.pos_embed.requires_grad_(True)  # fine-tuned, as in MAE / ViTDet

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks (for layer-wise lr decay)."""
        return self.encoder.num_layers

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def layer_id(self, name: str) -> int:
        """LLRD group of a parameter named relative to this module: 0 = embeddings,
        ``i + 1`` = block ``i`` (with its relative tables), ``num_layers + 1`` = the rest."""
        if name.startswith("rel_pos."):
            return int(name.split(".")[1]) + 1
        return self.encoder.layer_id(name)

    def init_weights(self) -> None:
        """Load ``init_checkpoint`` into the encoder (weights-only, strict)."""
        if not self.init_checkpoint:
            return
        self.encoder.load_timm_state_dict(
            read_state_dict(self.init_checkpoint), str(self.init_checkpoint)
        )

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Patch position embedding resized to the grid: ``[1, h, w, D]``."""
        pe = self.encoder.vit.pos_embed[:, 1:]  # [1, N0, D]
        gh, gw = self.encoder.grid_size
        pe = pe.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        if (gh, gw) != (h, w):
            pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1)

    def _block(self, i: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One timm block on ``[B, h, w, D]``, attending within windows or globally."""
        h, w = x.shape[1:3]
        y = blk.norm1(x)
        rel = self.rel_pos[i] if self.rel_pos is not None else None
        if i in self.windowed:
            y, padded = window_partition(y, self.window_size)  # [B * nW, ws, ws, D]
            y = attention(blk.attn, y, rel)
            y = window_unpartition(y, self.window_size, padded, (h, w))
        else:
            y = attention(blk.attn, y, rel)
        x = x + blk.drop_path1(blk.ls1(y))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, 3, H, W]`` -> maps ``[B, D, ceil(H/p), ceil(W/p)]`` of the ``out_indices`` blocks."""
        p = self.patch_size
        ph, pw = (-x.shape[2]) % p, (-x.shape[3]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        vit = self.encoder.vit
        t = vit.patch_embed.proj(x).permute(0, 2, 3, 1)  # [B, h, w, D]
        t = vit.patch_embed.norm(t)
        t = vit.pos_drop(t + self._pos_embed(t.shape[1], t.shape[2]))
        t = vit.norm_pre(t)
        maps: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(vit.blocks[: max(self.out_indices) + 1]):
            t = self._block(i, blk, t)
            if i in self.out_indices:
                maps[i] = t.permute(0, 3, 1, 2).contiguous()  # [B, D, h, w]
        return tuple(maps[i] for i in self.out_indices)


def rescale(dim: int, log2_scale: int, norm: str, halve: bool) -> tuple[nn.Module, int]:
    """A branch resizing ``[B, dim, h, w]`` by ``2 ** log2_scale``.

    Up: that many 2x2 stride-2 deconvolutions with norm + GELU between them (channels halved at
    each when ``halve``, as in ViTDet; kept as in BEiT); 0: identity; down: max pooling.

    Returns:
        The branch and its output channels.
    """
    if log2_scale == 0:
        return nn.Identity(), dim
    if log2_scale < 0:
        k = 2**-log2_scale
        return nn.MaxPool2d(kernel_size=k, stride=k), dim
    layers: list[nn.Module] = []
    c = dim
    for j in range(log2_scale):
        c_out = c // 2 if halve else c
        if j:
            layers += [_norm(norm, c), nn.GELU()]
        layers.append(nn.ConvTranspose2d(c, c_out, kernel_size=2, stride=2))
        c = c_out
    return nn.Sequential(*layers), c


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "ln":
        return LayerNorm2d(c)
    if kind == "bn":
        return nn.BatchNorm2d(c)
    raise ValueError(f"unknown norm '{kind}': use 'ln' or 'bn'")


def _log2_scale(patch_size: int, stride: int) -> int:
    k = math.log2(patch_size / stride)
    if k != int(k):
        raise ValueError(
            f"stride {stride} is not a power-of-two rescaling of patch size {patch_size}"
        )
    return int(k)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the last block's map.

    Args:
        in_dim: Encoder width D.
        patch_size: Encoder patch size (the stride of its map).
        out_channels: Channels of every level (256 in ViTDet).
        strides: Strides of the levels built by rescaling (4, 8, 16, 32).
        extra_pool: Append one more level by stride-2 subsampling of the last (stride 64).
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int,
        out_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
        extra_pool: bool = True,
    ) -> None:
        super().__init__()
        self.strides = list(strides)
        self.extra_pool = extra_pool
        self.levels = nn.ModuleList()
        for s in self.strides:
            branch, c = rescale(in_dim, _log2_scale(patch_size, s), "ln", halve=True)
            self.levels.append(nn.Sequential(
                branch,
                nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ))  # fmt: skip

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Last map ``[B, D, H/p, W/p]`` -> levels ``[B, C, H/s, W/s]`` for s in strides (+64)."""
        x = feats[-1]
        outs = [level(x) for level in self.levels]
        if self.extra_pool:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)


class MultiLevelNeck(nn.Module):
    """BEiT / MAE's neck for UperNet: map ``i`` rescaled to ``strides[i]``, channels kept.

    Args:
        in_dim: Encoder width D.
        patch_size: Encoder patch size.
        strides: Target stride of each input map (4, 8, 16, 32).
        norm: Norm between the two deconvolutions (``bn``: BEiT's (Sync)BatchNorm).
    """

    def __init__(
        self,
        in_dim: int,
        patch_size: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        norm: str = "bn",
    ) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            rescale(in_dim, _log2_scale(patch_size, s), norm, halve=False)[0] for s in strides
        )

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Four maps ``[B, D, H/p, W/p]`` -> ``[B, D, H/s_i, W/s_i]``."""
        if len(feats) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} feature maps, got {len(feats)}")
        return tuple(level(f) for level, f in zip(self.levels, feats, strict=True))
