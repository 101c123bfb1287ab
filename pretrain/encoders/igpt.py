"""The iGPT family: a transformer over the pixel sequence of a low-resolution image, each pixel
one token of a colour-cluster codebook (Chen et al., "Generative Pretraining from Pixels",
ICML 2020; reference code openai/image-gpt ``src/model.py``, function ``model``).

The encoder takes images like every family (so every probe task reads it): the normalized
image at the encoder's ``img_size`` (iGPT's 32^2, 48^2 or 64^2 input resolutions, Sec. 3.2) is
mapped to [0, 1] RGB and each pixel to its nearest entry of the codebook (:attr:`palette`,
``vocab_size`` entries, 512 in the paper: a 9-bit palette, Sec. 3.3), giving ``H * W`` token
ids in raster order (:meth:`IGPTEncoder.token_ids`). The codebook is fitted by the harness
before pretraining (the ``color_clusters`` target, :mod:`pretrain.color_clusters`, whose
palette :meth:`IGPTEncoder.set_codebook` copies here), is a buffer of the encoder, and so travels
with the run's checkpoint and the encoder file; an encoder whose codebook was never fitted
refuses to run.

The network follows the reference ``model``: token embedding ``wte`` (init std 0.02) plus a
learned position embedding ``wpe`` (std 0.01); pre-norm blocks (``x + attn(norm(x))``,
``x + mlp(norm(x))``) whose norm is the reference's ``norm`` (RMS normalisation with a gain, no
mean subtraction, no bias, eps 1e-5), attention without biases (q, k, v std ``1 / sqrt(D)``,
output std ``1 / sqrt(D * depth)``), an MLP of width ``4 D`` with the sigmoid GELU
``x * sigmoid(1.702 x)`` (init std 0.02, no biases), and a final norm ``ln_f``. Two objectives
(Sec. 2.1, 2.2), chosen by the recipe's masking strategy (:mod:`pretrain.masking`):

* BERT (``causal`` off): the embedding of every masked token is zeroed (the reference's
  ``h * M``) before the position embedding is added; attention is bidirectional.
* autoregressive (``causal`` on, the ``raster`` masker): the sequence is shifted right by one
  behind a learned start-of-sequence vector ``sos`` (std 0.02), and attention is causal in raster
  order, so output ``t`` has seen pixels ``< t`` only and predicts pixel ``t``. The probe tasks
  read the same shifted, causal sequence (features of the model as it was trained).

The token ids' output logits are the recipe's head (``linear``, :mod:`pretrain.simmim`); the
reference's separate output embedding ``wtet`` is that head (the reference starts it at zero,
``stddev=0.0``; the ``linear`` head keeps its own init).

Sequence length is ``H * W`` (1024 at 32^2, 4096 at 64^2) and attention is quadratic in it:
:func:`attention_bytes` estimates what the attention matrices of one image need for the backward
pass (``depth * heads * L^2 * 4`` bytes), and an encoder whose one image does not fit the memory
of the machine is refused before any weight is allocated, with the numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import ENCODER_PRESETS, EncoderConfig
from pretrain.encoders.base import Encoder, register_encoder
from pretrain.targets import to_unit
from pretrain.tokenizers import nearest

#: Bytes per attention-matrix entry in the estimate (float32).
ATTENTION_ENTRY_BYTES = 4


def attention_bytes(seq_len: int, heads: int, depth: int, batch: int = 1) -> int:
    """The memory the attention matrices need in a training step: one ``L x L`` matrix per head,
    block and image, kept for the backward pass, ``batch * depth * heads * L^2 * 4`` bytes."""
    return batch * depth * heads * seq_len * seq_len * ATTENTION_ENTRY_BYTES


def memory_budget() -> tuple[int, str]:
    """``(bytes, what)``: the memory a run may fill, the first GPU's when there is one, else the
    host's RAM."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "GPU 0's memory"
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "the host's RAM"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_sequence_fits(cfg: EncoderConfig) -> None:
    """Refuse an image size whose pixel sequence cannot be held in memory.

    Raises:
        ValueError: naming the sequence length, the estimate and its formula, the budget and
            the fix; raised before any weight is allocated.
    """
    side = int(cfg.img_size)  # type: ignore[arg-type]
    seq = side * side
    heads, depth = int(cfg.num_heads), int(cfg.depth)  # type: ignore[arg-type]
    need = attention_bytes(seq, heads, depth)
    budget, what = memory_budget()
    if need <= budget:
        return
    raise ValueError(
        f"igpt encoder '{cfg.arch}' at {side}x{side} px reads a sequence of L = {side}*{side} = "
        f"{seq} pixel tokens; its attention matrices need depth x heads x L^2 x "
        f"{ATTENTION_ENTRY_BYTES} B = {depth} x {heads} x {seq}^2 x {ATTENTION_ENTRY_BYTES} B = "
        f"{_gib(need)} for one image, more than {what} ({_gib(budget)}): set encoder.img_size "
        "to 32, 48 or 64 (iGPT's input resolutions) or a smaller value"
    )


class _Norm(nn.Module):
    """The reference's ``norm``: ``x / sqrt(mean(x^2) + eps) * g`` (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Block(nn.Module):
    """A pre-norm transformer block without biases (the reference's ``block``)."""

    def __init__(self, dim: int, heads: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = _Norm(dim), _Norm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        hidden = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.qkv.weight, std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(dim * depth))
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=0.02)

    def attention(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, L, D]

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), causal)
        h = self.fc(self.ln_2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


@register_encoder
class IGPTEncoder(Encoder):
    """iGPT's transformer over colour-cluster pixel tokens.

    Args:
        cfg: Encoder config of a ``family: igpt`` preset (``patch_size`` 1: one token a pixel).
        options: ``causal``: the autoregressive model (shifted input, causal attention); off:
            the BERT model.

    Attributes:
        palette: ``[vocab_size, 3]`` codebook in [0, 1] RGB (zeros until fitted).
        fitted: Whether the codebook was fitted (or restored).
    """

    family: ClassVar[str] = "igpt"
    isotropic: ClassVar[bool] = True
    tokenizes_pixels: ClassVar[bool] = True
    full_grid_reason: ClassVar[str] = "it reads the whole pixel sequence"
    option_defaults: ClassVar[dict[str, bool]] = {"causal": False}

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cfg, options)
        if self.patch_size != 1:
            raise ValueError(
                f"an igpt encoder reads one token per pixel: patch_size must be 1, got "
                f"{self.patch_size}"
            )
        check_sequence_fits(cfg)
        side = int(cfg.img_size)  # type: ignore[arg-type]
        self._set_grid((side, side))
        self.causal = self.options["causal"]
        self.vocab_size = int(ENCODER_PRESETS[cfg.arch]["vocab_size"])
        d, depth = self.embed_dim, int(cfg.depth)  # type: ignore[arg-type]
        self.register_buffer("palette", torch.zeros(self.vocab_size, 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.wte = nn.Embedding(self.vocab_size, d)
        self.wpe = nn.Parameter(torch.randn(1, self.num_patches, d) * 0.01)
        nn.init.normal_(self.wte.weight, std=0.02)
        self.sos = nn.Parameter(torch.randn(1, 1, d) * 0.02) if self.causal else None
        heads, ratio = int(cfg.num_heads), float(cfg.mlp_ratio)  # type: ignore[arg-type]
        self.blocks = nn.ModuleList(_Block(d, heads, depth, ratio) for _ in range(depth))
        self.ln_f = _Norm(d)

    # ------------------------------------------------------------------ the codebook
    def set_codebook(self, palette: torch.Tensor) -> None:
        """Take the fitted colour clusters ``[vocab_size, 3]`` in [0, 1] RGB."""
        if tuple(palette.shape) != (self.vocab_size, 3):
            raise ValueError(
                f"igpt encoder '{self.cfg.arch}' has a {self.vocab_size}-entry codebook; got "
                f"{tuple(palette.shape)}: set target.clusters to {self.vocab_size}"
            )
        self.palette.copy_(palette)
        self.fitted.fill_(True)

    @property
    def codebook_fitted(self) -> bool:
        return bool(self.fitted)

    def token_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images ``[B, 3, H, W]`` to codebook ids ``[B, H*W]`` in raster order."""
        self._check_input(x)
        if not self.codebook_fitted:
            raise ValueError(
                f"the colour-cluster codebook of igpt encoder '{self.cfg.arch}' is not fitted: "
                "it is fitted before the first step of a fresh pretraining run (the "
                "color_clusters target) and saved with the run; load a trained igpt encoder"
            )
        unit = to_unit(x.float()).permute(0, 2, 3, 1).reshape(-1, 3)  # [B*H*W, 3]
        return nearest(unit, self.palette.float()).view(x.shape[0], -1)  # [B, L]

    # ------------------------------------------------------------------ the contract
    @property
    def trunk(self) -> nn.Module:
        return self  # not a timm model: the file holds the weights and the codebook

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        return "", {}

    def residual_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        return self.ln_f(t)

    def no_weight_decay(self) -> set[str]:
        """The position embedding and the start-of-sequence vector (1-D norms are left out by
        the optimizer's rule)."""
        return {"wpe"} | ({"sos"} if self.causal else set())

    def layer_id(self, name: str) -> int:
        """0 = embeddings, i + 1 = block i, depth + 1 = the final norm."""
        name = name.removeprefix("encoder.")
        if name.startswith(("wte", "wpe", "sos")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    # ------------------------------------------------------------------ forwards
    def embed_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, L]`` to the blocks' input ``[B, L, D]``: BERT zeroes the masked
        tokens' embeddings; the autoregressive model shifts right behind ``sos`` (and ignores
        ``mask``: every position is predicted)."""
        h = self.wte(ids)  # [B, L, D]
        if self.sos is not None:
            h = torch.cat([self.sos.expand(h.shape[0], -1, -1).to(h.dtype), h[:, :-1]], dim=1)
        elif mask is not None:
            h = h * (~mask).unsqueeze(-1).to(h.dtype)
        return h + self.wpe.to(h.dtype)

    def blocks_from_ids(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``[B, L, D]`` after each block (no final norm) from token ids ``[B, L]``."""
        t = self.embed_ids(ids, mask)
        outs = []
        for blk in self.blocks:
            t = blk(t, self.causal)
            outs.append(t)
        return outs

    def forward_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens ``[B, L, D]`` after the final norm from token ids ``[B, L]``."""
        t = self.embed_ids(ids, mask)
        for blk in self.blocks:
            t = blk(t, self.causal)
        return self.ln_f(t)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens ``[B, H*W, D]`` of normalized images ``[B, 3, H, W]``."""
        return self.forward_ids(self.token_ids(x), mask)

    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        return self.blocks_from_ids(self.token_ids(x), mask)

    @torch.no_grad()
    def complete(
        self, ids: torch.Tensor, start: int, logits: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Autoregressive completion: positions ``start..L-1`` of ``ids`` ``[B, L]`` drawn one
        at a time from ``softmax(logits(tokens))`` (the reference's naive sampler in
        ``src/run.py``, ``sample``), ``logits`` mapping output tokens ``[B, L, D]`` to
        ``[B, L, vocab]``; ``generator`` None takes the most likely id instead."""
        if not self.causal:
            raise ValueError("completion in raster order needs the autoregressive (causal) model")
        out = ids.clone()
        for t in range(start, out.shape[1]):
            p = logits(self.forward_ids(out))[:, t].float().softmax(-1)  # [B, vocab]
            if generator is None:
                out[:, t] = p.argmax(-1)
            else:
                out[:, t] = torch.multinomial(p.cpu(), 1, generator=generator).view(-1).to(out)
        return out
