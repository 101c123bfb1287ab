"""Attentive probing of frozen encoders: learned query pooling over patch tokens, then a linear
classifier, with the published head definitions as presets.

A linear probe reads one global vector; a masked-image-modeling encoder spreads what it knows
over its patch tokens, so papers since CAE report an attentive probe as well. The presets
(:data:`PRESETS`; ``D`` is the token width, every preset attends with ``max(1, D // 64)`` heads,
the head count of the standard ViTs the papers probe):

* ``cae``: CAE (Chen et al., "Context Autoencoder for Self-Supervised Representation Learning",
  IJCV 2023; ``Atten4Vis/CAE`` ``models/modeling_finetune.py``, its attentive block): one learned
  query, one cross-attention with a LayerNorm on each of its query, key and value inputs (q, k, v
  and output projections), no residual and no MLP, then an affine-free BatchNorm and the linear
  classifier.
* ``vjepa``: V-JEPA (Bardes et al., 2024; ``facebookresearch/jepa``
  ``src/models/attentive_pooler.py``, ``AttentivePooler`` / ``AttentiveClassifier`` with
  depth 1): one learned query, a cross-attention block (LayerNorm on the tokens, residual, then
  LayerNorm + MLP with residual), then the linear classifier.
* ``vjepa2``: V-JEPA 2 (Assran et al., 2025; ``facebookresearch/vjepa2``
  ``src/models/attentive_pooler.py``, the same pooler with depth 4): three self-attention blocks
  over the tokens, then V-JEPA's cross-attention block.
* ``aim``: AIM (El-Nouby et al., "Scalable Pre-training of Large Autoregressive Image Models",
  2024; ``apple/ml-aim`` ``aim-v1/aim/v1/torch/layers.py``, ``AttentionPoolingClassifier``):
  the tokens averaged over the last ``aim_avg_blocks`` blocks, an affine-free BatchNorm over the
  tokens, key and value projections attended by the learned query itself (no query or output
  projection), then the linear classifier.
* ``capi``: CAPI (Darcet et al., "Cluster and Predict Latent Patches", 2025, arXiv 2502.08769;
  ``facebookresearch/capi``): one learned query, ``D / 64`` heads of width 64, key and value
  projections, no norm, then the linear classifier.

Every linear layer and the queries start from a truncated normal of std 0.02 (V-JEPA's
``init_std``); heads of one preset start from the same weights whatever their lr and weight
decay. The heads read the patch tokens after the encoder's final norm (class tokens dropped).

Protocol (the fast linear probe's, :mod:`downstream.linear_probe`): a grid of heads (presets x
``lrs`` x ``weight_decays`` x ``layers``) is trained in one pass over the data: every step feeds
the same batch of tokens to every head (one backward through the sum of their losses, one AdamW
per head, linear warmup then cosine, lr scaled by ``batch / 256``). Tokens come from an fp16
cache (extracted once, kept on disk, its size printed) for small sets or from the frozen encoder
under ``no_grad`` batch by batch for large ones (``token_source``; ``auto`` caches when the
tokens fit ``cache_max_gb``). The head is chosen on a held-out, class-stratified part of train
and reported on val: ``top1`` / ``top5`` among the heads on the last block, ``top1_best_layer``
among the heads on every block of ``layers``; the record names the winners and lists every
head's numbers.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from downstream.classifier import SavedClassifier, register_classifier, save_classifier
from downstream.features import default_feature_cache_dir, encoder_fingerprint, split_key
from downstream.linear_probe import stratified_holdout, topk_accuracy
from harness.core.config import DataConfig, TaskConfig
from harness.core.data.datasets import (
    SkipTally,
    check_classification_data,
    collate_skipping,
    eval_transform,
    imagefolder_checked,
    resolve_imagefolder_root,
)
from harness.core.fsutil import atomic_write_bytes
from harness.core.training import autocast_dtype, lr_at
from pretrain.encoders.base import Encoder

from .base import BenchBatch, Task, TaskContext, TaskResult, register_task

PresetName = Literal["cae", "vjepa", "vjepa2", "aim", "capi"]


@dataclass(frozen=True)
class HeadPreset:
    """One published attentive head (see the module docstring for the sources).

    Attributes:
        self_blocks: Self-attention blocks over the tokens before the cross-attention.
        token_norm: Norm of the tokens the query attends to: ``ln`` (LayerNorm), ``bn``
            (affine-free BatchNorm over tokens), ``none``.
        qkv_norm: A LayerNorm on each of the query, key and value inputs (CAE).
        q_proj: A query projection (else the learned query attends as it is).
        out_proj: An output projection after the attention.
        mlp_block: Residual + LayerNorm + MLP with residual around the cross-attention (V-JEPA).
        out_bn: An affine-free BatchNorm before the classifier (CAE).
        avg_blocks: Average the tokens of the last ``aim_avg_blocks`` blocks (AIM).
    """

    self_blocks: int = 0
    token_norm: Literal["ln", "bn", "none"] = "none"
    qkv_norm: bool = False
    q_proj: bool = True
    out_proj: bool = True
    mlp_block: bool = False
    out_bn: bool = False
    avg_blocks: bool = False


PRESETS: dict[str, HeadPreset] = {
    "cae": HeadPreset(qkv_norm=True, out_bn=True),
    "vjepa": HeadPreset(token_norm="ln", mlp_block=True),
    "vjepa2": HeadPreset(self_blocks=3, token_norm="ln", mlp_block=True),
    "aim": HeadPreset(token_norm="bn", q_proj=False, out_proj=False, avg_blocks=True),
    "capi": HeadPreset(q_proj=False, out_proj=False),
}


class AttentiveProbeConfig(TaskConfig):
    """Attentive probe (see :mod:`downstream.attentive_probe`).

    Attributes:
        presets: Head definitions in the grid (:data:`PRESETS`).
        lrs: Base AdamW learning rates (scaled by ``batch_size / 256``).
        weight_decays: AdamW weight decays.
        layers: Blocks whose tokens the heads read, Python-style from the end (-1: the last
            block, which ``top1`` reports), or ``all``; the best of them is ``top1_best_layer``.
        aim_avg_blocks: Blocks the ``aim`` preset averages (ending at the probed block).
        epochs: Passes over train.
        warmup_epochs: Linear lr warmup.
        min_lr: Floor of the cosine schedule (absolute).
        batch_size: Images per step (every head sees the same batch).
        holdout_fraction: Part of train (per class) held out to choose the head.
        token_source: ``cache`` (fp16 tokens extracted once and kept on disk), ``online`` (the
            frozen encoder under no_grad every step), ``auto`` (cache when it fits
            ``cache_max_gb``).
        cache_max_gb: Largest token cache (train + val) ``auto`` writes.
        cache_dir: Token cache directory (default ``$MIMBENCH_CACHE/tokens``).
        batch_size_extract: Batch of the token extraction and of the evaluation.
        strict_data: Unreadable image files are fatal instead of skipped and counted.
    """

    name: Literal["attentive_probe"] = "attentive_probe"
    presets: list[PresetName] = Field(
        default_factory=lambda: ["cae", "vjepa", "vjepa2", "aim", "capi"], min_length=1
    )
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3], min_length=1)
    weight_decays: list[float] = Field(default_factory=lambda: [0.01, 0.1], min_length=1)
    layers: list[int] | Literal["all"] = Field(default_factory=lambda: [-1])
    aim_avg_blocks: int = Field(6, ge=1)
    epochs: int = Field(20, ge=1)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=0.5)
    token_source: Literal["auto", "cache", "online"] = "auto"
    cache_max_gb: float = Field(8.0, ge=0)
    cache_dir: str | None = None
    batch_size_extract: int = Field(128, ge=1)
    strict_data: bool = False

    @model_validator(mode="after")
    def _layers_from_the_end(self) -> AttentiveProbeConfig:
        if self.layers != "all":
            if any(i >= 0 for i in self.layers):
                raise ValueError(
                    f"layers count from the end (-1 = the last block), got {self.layers}"
                )
            if -1 not in self.layers:
                raise ValueError(f"layers must include -1 (the last block, top1), got {self.layers}")
        if any(lr <= 0 for lr in self.lrs) or any(wd < 0 for wd in self.weight_decays):
            raise ValueError("lrs must be > 0 and weight_decays >= 0")
        return self


# --------------------------------------------------------------------------- the head


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class AttentiveHead(nn.Module):
    """Learned query pooling over tokens then a linear classifier, as one :class:`HeadPreset`.

    Args:
        preset: The head definition.
        dim: Token width ``D``.
        num_classes: Output classes.
    """

    def __init__(self, preset: HeadPreset, dim: int, num_classes: int) -> None:
        super().__init__()
        from timm.layers import Mlp
        from timm.models.vision_transformer import Block

        self.preset = preset
        self.num_heads = max(1, dim // 64)
        if dim % self.num_heads:
            raise ValueError(f"token width {dim} is not a multiple of {self.num_heads} heads")
        self.token_norm: nn.Module = {
            "ln": nn.LayerNorm(dim, eps=1e-6),
            "bn": nn.BatchNorm1d(dim, affine=False),
            "none": nn.Identity(),
        }[preset.token_norm]
        self.blocks = nn.ModuleList(
            Block(dim, self.num_heads, mlp_ratio=4.0, qkv_bias=True)
            for _ in range(preset.self_blocks)
        )
        self.query = nn.Parameter(torch.zeros(1, 1, dim))  # [1, Q = 1, D]
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_q = nn.LayerNorm(dim, eps=1e-6) if preset.qkv_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(dim, eps=1e-6) if preset.qkv_norm else nn.Identity()
        self.norm_v = nn.LayerNorm(dim, eps=1e-6) if preset.qkv_norm else nn.Identity()
        self.q = nn.Linear(dim, dim) if preset.q_proj else nn.Identity()
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim) if preset.out_proj else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if preset.mlp_block else nn.Identity()
        self.mlp = Mlp(dim, 4 * dim) if preset.mlp_block else None
        self.out_bn = nn.BatchNorm1d(dim, affine=False) if preset.out_bn else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)
        self.apply(_init_weights)

    def _norm_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.token_norm, nn.BatchNorm1d):
            return self.token_norm(x.flatten(0, 1)).view_as(x)  # over every token of the batch
        return self.token_norm(x)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head cross-attention: ``[B, Q, D]`` queries over ``[B, T, D]`` -> ``[B, Q, D]``."""
        b, t, d = k.shape
        h = self.num_heads
        qh = self.q(q).view(b, -1, h, d // h).transpose(1, 2)  # [B, h, Q, d/h]
        kh = self.k(k).view(b, t, h, d // h).transpose(1, 2)  # [B, h, T, d/h]
        vh = self.v(v).view(b, t, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh)  # [B, h, Q, d/h]
        return self.proj(out.transpose(1, 2).reshape(b, -1, d))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector ``[B, D]`` of tokens ``x`` ``[B, T, D]``."""
        if self.preset.token_norm == "bn":
            x = self._norm_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        if self.preset.token_norm == "ln":
            x = self._norm_tokens(x)
        q = self.query.expand(x.shape[0], -1, -1)  # [B, 1, D]
        y = self._attend(self.norm_q(q), self.norm_k(x), self.norm_v(x))  # [B, 1, D]
        if self.mlp is not None:
            y = q + y
            y = y + self.mlp(self.norm2(y))
        return self.out_bn(y.mean(dim=1))  # [B, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


# --------------------------------------------------------------------------- tokens


class TokenSource:
    """Patch tokens of the last ``n_blocks`` blocks of one split, ``[B, n_blocks, T, D]`` per
    batch (blocks in depth order, the last one last), for the rows of ``labels``."""

    labels: torch.Tensor

    def batches(
        self, order: torch.Tensor, batch_size: int, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(tokens [B, n, T, D] float32 on the device, labels [B])`` over ``order``'s rows."""
        raise NotImplementedError


class CachedTokens(TokenSource):
    """Tokens extracted once (fp16, on CPU; see :func:`cached_tokens`)."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, device: torch.device) -> None:
        self.tokens, self.labels, self.device = tokens, labels, device

    def batches(
        self, order: torch.Tensor, batch_size: int, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield self.tokens[idx].to(self.device, torch.float32), self.labels[idx].to(self.device)


class OnlineTokens(TokenSource):
    """Tokens computed by the frozen encoder under ``no_grad`` batch by batch (large sets).

    Rows are the dataset's samples; unreadable images are dropped from their batch and counted.
    """

    def __init__(
        self, encoder: Encoder, ds: Any, n_blocks: int, device: torch.device, workers: int
    ) -> None:
        self.encoder, self.ds, self.n_blocks, self.device = encoder, ds, n_blocks, device
        self.workers = workers
        self.labels = torch.tensor([t for _, t in ds.samples], dtype=torch.long)
        self.skips = SkipTally(ds, "")

    def batches(
        self, order: torch.Tensor, batch_size: int, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        chunks = [order[i : i + batch_size].tolist() for i in range(0, stop, batch_size)]
        loader = DataLoader(self.ds, batch_sampler=chunks, num_workers=self.workers,
                            collate_fn=collate_skipping,
                            pin_memory=self.device.type == "cuda")  # fmt: skip
        for chunk, (x, y, keep) in zip(chunks, loader, strict=True):
            self.skips.add(chunk, keep)
            self.skips.check_readable()
            if x.numel() == 0:
                continue
            yield block_tokens(self.encoder, x.to(self.device), self.n_blocks), y.to(self.device)


@torch.no_grad()
def block_tokens(encoder: Encoder, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Patch tokens after each of the last ``n_blocks`` blocks (through the final norm) of the
    frozen ``encoder``: ``[B, n_blocks, T, D]`` float32."""
    encoder.eval()
    amp = autocast_dtype("auto", x.device)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        blocks = encoder.last_blocks(x, n_blocks)  # n x [B, P + T, D]
    p = encoder.num_prefix_tokens
    return torch.stack([t[:, p:] for t in blocks], dim=1).float()


def cached_tokens(
    encoder: Encoder, ds: Any, split: str, tf: Any, n_blocks: int, device: torch.device,
    cfg: AttentiveProbeConfig, workers: int, log: Any,
) -> tuple[CachedTokens, int, int]:  # fmt: skip
    """The fp16 tokens of one split from the on-disk cache, or extracted and cached.

    Returns:
        ``(tokens, bytes on disk, images skipped)``.
    """
    from safetensors.torch import load_file, save

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else token_cache_dir()
    key = split_key(encoder_fingerprint(encoder), ds, split, tf, device, torch.float16)
    path = cache / f"{key}-tokens-b{n_blocks}.safetensors"
    if path.exists():
        got = load_file(str(path))
        log(f"[attentive_probe] {split}: tokens read from cache {path.name}")
        return CachedTokens(got["tokens"], got["labels"], device), path.stat().st_size, int(
            got["skipped"].item()
        )
    loader = DataLoader(ds, batch_size=cfg.batch_size_extract, shuffle=False,
                        num_workers=workers, collate_fn=collate_skipping)  # fmt: skip
    tally = SkipTally(ds, split)
    toks, ys = [], []
    t0 = time.time()
    for x, y, keep in loader:
        tally.add(range(tally.seen, tally.seen + len(keep)), keep)
        if x.numel() == 0:
            continue
        toks.append(block_tokens(encoder, x.to(device), n_blocks).to("cpu", torch.float16))
        ys.append(y)
    tally.report(log)
    tally.check_readable()
    tokens, labels = torch.cat(toks), torch.cat(ys)  # [N, n, T, D], [N]
    blob = save({"tokens": tokens.contiguous(), "labels": labels.contiguous(),
                 "skipped": torch.tensor(tally.num_skipped)})  # fmt: skip
    atomic_write_bytes(path, blob)
    log(
        f"[attentive_probe] {split}: {len(labels)} images x {n_blocks} blocks x "
        f"{tokens.shape[2]} tokens x {tokens.shape[3]} in {time.time() - t0:.1f}s; token cache "
        f"{len(blob) / 2**20:.1f} MiB (fp16) at {path}"
    )
    return CachedTokens(tokens, labels, device), len(blob), tally.num_skipped


def token_cache_dir() -> Path:
    """``$MIMBENCH_CACHE/tokens`` (next to the feature cache)."""
    return default_feature_cache_dir().parent / "tokens"


# --------------------------------------------------------------------------- the grid


@dataclass
class GridHead:
    """One head of the grid: its place in it, its module and its optimizer."""

    preset: str
    lr: float
    weight_decay: float
    layer: int  # from the end, -1 = the last block
    model: AttentiveHead
    opt: torch.optim.Optimizer


def build_grid(
    cfg: AttentiveProbeConfig, layers: list[int], dim: int, num_classes: int, seed: int,
    device: torch.device,
) -> list[GridHead]:  # fmt: skip
    """Every (preset, lr, weight decay, layer) head; the heads of one preset start equal."""
    heads = []
    for preset in cfg.presets:
        for layer in layers:
            for lr in cfg.lrs:
                for wd in cfg.weight_decays:
                    heads.append(make_head(preset, lr, wd, layer, dim, num_classes, seed, device))
    return heads


def make_head(
    preset: str, lr: float, wd: float, layer: int, dim: int, num_classes: int, seed: int,
    device: torch.device,
) -> GridHead:  # fmt: skip
    """A head whose init depends on (seed, preset) only (AdamW; no weight decay on biases,
    norms and the query)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(preset.encode()))
        model = AttentiveHead(PRESETS[preset], dim, num_classes).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n != "query"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n != "query")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)  # fmt: skip
    return GridHead(preset, lr, wd, layer, model, opt)


def head_input(tokens: torch.Tensor, layer: int, preset: str, avg_blocks: int) -> torch.Tensor:
    """What a head reads from ``tokens`` ``[B, n, T, D]``: block ``layer`` (from the end), or
    for AIM the mean of the ``avg_blocks`` blocks ending there (as many as there are)."""
    n = tokens.shape[1]
    end = n + layer  # position of the block
    if not PRESETS[preset].avg_blocks:
        return tokens[:, end]
    return tokens[:, max(0, end - avg_blocks + 1) : end + 1].mean(dim=1)


def train_grid(
    heads: list[GridHead], source: TokenSource, fit: torch.Tensor, cfg: AttentiveProbeConfig,
    seed: int,
) -> list[float]:  # fmt: skip
    """Train every head on the same batches of ``fit``'s rows; returns the summed loss per step.

    Each epoch's order is a permutation of ``fit`` seeded by (seed, epoch), so training the heads
    one by one with the same ``seed`` gives each head the same batches as the grid does.
    """
    bs = min(cfg.batch_size, len(fit))
    spe = max(1, len(fit) // bs)
    total, warmup = cfg.epochs * spe, cfg.warmup_epochs * spe
    losses: list[float] = []
    step = 0
    for epoch in range(cfg.epochs):
        g = torch.Generator().manual_seed(seed * 7_919 + epoch)
        order = fit[torch.randperm(len(fit), generator=g)]
        for tokens, y in source.batches(order, bs, drop_last=True):
            inputs: dict[tuple[int, bool], torch.Tensor] = {}
            loss = tokens.new_zeros(())
            for h in heads:
                key = (h.layer, PRESETS[h.preset].avg_blocks)
                if key not in inputs:
                    inputs[key] = head_input(tokens, h.layer, h.preset, cfg.aim_avg_blocks)
                loss = loss + F.cross_entropy(h.model(inputs[key]), y)
            for h in heads:
                peak = h.lr * bs / 256
                for group in h.opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup, peak, min(cfg.min_lr, peak))
                h.opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"attentive probe loss is {loss.item()}: lower lrs")
            for h in heads:
                h.opt.step()
            losses.append(float(loss.item()))
            step += 1
    return losses


@torch.no_grad()
def evaluate_grid(
    heads: list[GridHead], source: TokenSource, rows: torch.Tensor, cfg: AttentiveProbeConfig
) -> list[tuple[float, float]]:
    """``(top1, top5)`` of every head on ``rows`` (one pass over their tokens)."""
    for h in heads:
        h.model.eval()
    logits: list[list[torch.Tensor]] = [[] for _ in heads]
    ys = []
    for tokens, y in source.batches(rows, cfg.batch_size_extract, drop_last=False):
        for i, h in enumerate(heads):
            logits[i].append(h.model(head_input(tokens, h.layer, h.preset, cfg.aim_avg_blocks)).cpu())
        ys.append(y.cpu())
    yy = torch.cat(ys) if ys else torch.empty(0, dtype=torch.long)
    out = []
    for per in logits:
        lv = torch.cat(per) if per else torch.empty(0, 1)
        out.append((topk_accuracy(lv, yy, 1), topk_accuracy(lv, yy, 5)))
    return out


# --------------------------------------------------------------------------- the task


@register_task("attentive_probe")
class AttentiveProbe(Task):
    """Attentive probe (see the module docstring)."""

    name = "attentive_probe"
    version = 1
    metrics = {"top1": True, "top5": True, "top1_best_layer": True}
    config_cls = AttentiveProbeConfig

    def check_data(self, cfg: TaskConfig, data: DataConfig) -> None:
        """The ImageFolder's train and val splits, with the same classes."""
        check_classification_data(data)

    def bench_step(self, encoder: Any, batch: BenchBatch) -> Callable[[], None]:
        """One online step: the frozen forward under no_grad, then forward, backward and AdamW
        update of one head of each preset (lr 1e-3, weight decay 0.01) on the last block."""
        device = batch.images.device
        cfg = AttentiveProbeConfig()
        heads = [make_head(p, 1e-3, 0.01, -1, int(encoder.num_features), batch.num_classes, 0,
                           device) for p in cfg.presets]  # fmt: skip

        def step() -> None:
            with batch.autocast():
                tokens = block_tokens(encoder, batch.images, 1)  # [B, 1, T, D]
                loss = sum(F.cross_entropy(h.model(tokens[:, -1]), batch.labels) for h in heads)
            for h in heads:
                h.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            for h in heads:
                h.opt.step()

        return step

    def run(self, encoder: Any, cfg: TaskConfig, ctx: TaskContext) -> TaskResult:
        assert isinstance(cfg, AttentiveProbeConfig)
        t0 = time.time()
        layers = self._layers(encoder, cfg)
        n_blocks = self._blocks_needed(encoder, cfg, layers)
        root = resolve_imagefolder_root(ctx.data)
        tf = eval_transform(int(encoder.cfg.img_size), ctx.data.eval_crop_pct)
        strict = cfg.strict_data or ctx.data.strict_data
        train = imagefolder_checked(root, "train", tf, strict)
        val = imagefolder_checked(root, "val", tf, strict)
        num_classes = len(train.classes)
        dim = int(encoder.num_features)
        grid_h, grid_w = encoder.feature_grid
        tokens_per_image = int(grid_h * grid_w)  # output tokens (Swin: fewer than patches)
        encoder.to(ctx.device).eval()
        mode, cache_bytes, skipped = self._source_mode(cfg, len(train) + len(val), n_blocks,
                                                       tokens_per_image, dim), 0, {}  # fmt: skip
        src_tr: TokenSource
        src_va: TokenSource
        if mode == "cache":
            src_tr, b_tr, skipped["train"] = cached_tokens(encoder, train, "train", tf, n_blocks,
                                                           ctx.device, cfg, ctx.data.num_workers,
                                                           ctx.log)  # fmt: skip
            src_va, b_va, skipped["val"] = cached_tokens(encoder, val, "val", tf, n_blocks,
                                                         ctx.device, cfg, ctx.data.num_workers,
                                                         ctx.log)  # fmt: skip
            cache_bytes = b_tr + b_va
            ctx.log(f"[attentive_probe] token cache on disk: {cache_bytes / 2**20:.1f} MiB")
        else:
            src_tr = OnlineTokens(encoder, train, n_blocks, ctx.device, ctx.data.num_workers)
            src_va = OnlineTokens(encoder, val, n_blocks, ctx.device, ctx.data.num_workers)
        t_tokens = time.time() - t0
        fit, hold = stratified_holdout(src_tr.labels, cfg.holdout_fraction, ctx.seed)
        heads = build_grid(cfg, layers, dim, num_classes, ctx.seed, ctx.device)
        ctx.log(f"[attentive_probe] {len(heads)} heads ({len(cfg.presets)} presets x "
                f"{len(cfg.lrs)} lrs x {len(cfg.weight_decays)} wds x {len(layers)} layers), "
                f"tokens {mode}, {len(fit)} train / {len(hold)} holdout")  # fmt: skip
        t1 = time.time()
        losses = train_grid(heads, src_tr, fit, cfg, ctx.seed)
        t_train = time.time() - t1
        on_hold = evaluate_grid(heads, src_tr, hold, cfg)
        on_val = evaluate_grid(heads, src_va, torch.arange(len(src_va.labels)), cfg)
        table = [
            {"preset": h.preset, "lr": h.lr, "weight_decay": h.weight_decay, "layer": h.layer,
             "holdout_top1": ho[0], "val_top1": va[0], "val_top5": va[1]}
            for h, ho, va in zip(heads, on_hold, on_val, strict=True)
        ]  # fmt: skip
        for name, src in (("train", src_tr), ("val", src_va)):
            if isinstance(src, OnlineTokens):
                skipped[name] = src.skips.num_skipped
        last = max((r for r in table if r["layer"] == -1), key=lambda r: r["holdout_top1"])
        best = max(table, key=lambda r: r["holdout_top1"])  # first of ties: grid order
        chosen = heads[table.index(last)]
        save_classifier(ctx.out_dir, SavedClassifier(
            "attentive_probe", list(train.classes),
            {**_head_key(last), "dim": dim, "aim_avg_blocks": cfg.aim_avg_blocks,
             "n_blocks": self._blocks_needed(encoder, cfg, [-1])},
            chosen.model.state_dict()))  # fmt: skip
        ctx.log(f"[attentive_probe] last block: {_name(last)} holdout {last['holdout_top1']:.1f}"
                f" -> val top1 {last['val_top1']:.2f}; best layer {best['layer']}: {_name(best)}"
                f" -> val top1 {best['val_top1']:.2f}")  # fmt: skip
        return TaskResult(
            metrics={"top1": last["val_top1"], "top5": last["val_top5"],
                     "top1_best_layer": best["val_top1"]},  # fmt: skip
            details={
                "best_head": _head_key(last),
                "best_layer_head": _head_key(best),
                "holdout_top1": last["holdout_top1"],
                "heads": table,
                "num_classes": num_classes,
                "num_train": len(fit),
                "num_holdout": len(hold),
                "num_val": int(len(src_va.labels)),
                "token_source": mode,
                "token_cache_bytes": cache_bytes,
                "skipped_images": skipped,
                "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None,
                "token_seconds": t_tokens,
                "head_seconds": t_train,
                "total_seconds": time.time() - t0,
            },
        )

    @staticmethod
    def _layers(encoder: Encoder, cfg: AttentiveProbeConfig) -> list[int]:
        """The probed blocks, from the end (-1 first).

        Raises:
            ValueError: A block the encoder does not have.
        """
        depth = encoder.num_feature_blocks
        layers = list(range(-1, -depth - 1, -1)) if cfg.layers == "all" else sorted(
            set(cfg.layers), reverse=True)  # fmt: skip
        if -min(layers) > depth:
            raise ValueError(
                f"layers {cfg.layers} reach past the {depth} readable block(s) of "
                f"{type(encoder).__name__}: use layers within -1..-{depth} (or all)"
            )
        return layers

    @staticmethod
    def _blocks_needed(encoder: Encoder, cfg: AttentiveProbeConfig, layers: list[int]) -> int:
        """Last blocks to read: the deepest probed one, and AIM's averaging window."""
        need = -min(layers)
        if "aim" in cfg.presets:
            need = need + cfg.aim_avg_blocks - 1
        return min(need, encoder.num_feature_blocks)

    @staticmethod
    def _source_mode(cfg: AttentiveProbeConfig, images: int, n_blocks: int, tokens: int,
                     dim: int) -> str:  # fmt: skip
        """``cache`` or ``online``: ``auto`` caches when fp16 tokens fit ``cache_max_gb``."""
        if cfg.token_source != "auto":
            return cfg.token_source
        need = images * n_blocks * tokens * dim * 2  # bytes, fp16
        return "cache" if need <= cfg.cache_max_gb * 2**30 else "online"


class AttentiveClassifier(nn.Module):
    """The frozen encoder and a saved attentive head (the one ``top1`` reports: last block):
    the head reads :func:`head_input` of the last ``n_blocks`` blocks' tokens.

    Args:
        encoder: The frozen encoder.
        head: The attentive head.
        preset: Its preset name.
        n_blocks: Blocks of tokens read (AIM averages several).
        aim_avg_blocks: Blocks the ``aim`` preset averages.
    """

    def __init__(self, encoder: Encoder, head: AttentiveHead, preset: str, n_blocks: int,
                 aim_avg_blocks: int) -> None:  # fmt: skip
        super().__init__()
        self.encoder, self.head, self.preset = encoder, head, preset
        self.n_blocks, self.aim_avg_blocks = n_blocks, aim_avg_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = block_tokens(self.encoder, x, self.n_blocks)  # [B, n, T, D]
        return self.head(head_input(tokens, -1, self.preset, self.aim_avg_blocks))


@register_classifier("attentive_probe")
def attentive_probe_classifier(encoder: Encoder, saved: SavedClassifier) -> nn.Module:
    """The attentive probe's chosen last-block head on ``encoder``."""
    spec = saved.spec
    head = AttentiveHead(PRESETS[spec["preset"]], int(spec["dim"]), len(saved.classes))
    head.load_state_dict(saved.state)
    return AttentiveClassifier(encoder, head, spec["preset"], int(spec["n_blocks"]),
                               int(spec["aim_avg_blocks"]))  # fmt: skip


def _head_key(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("preset", "lr", "weight_decay", "layer")}


def _name(row: dict[str, Any]) -> str:
    return f"{row['preset']} lr={row['lr']:g} wd={row['weight_decay']:g}"

