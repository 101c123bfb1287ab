"""CAPI-style clustering targets (Darcet et al., "Cluster and Predict Latent Patches for Improved
Masked Image Modeling", 2025; reference code: facebookresearch/capi, ``model.py`` and
``train_capi.py``).

* Target (``target.type: online_clusters``, :class:`ClusterTarget`): the EMA teacher
  (:mod:`pretrain.teacher`) encodes the unmasked image; an online clustering head (a linear
  layer on L2-normalized patch tokens, :class:`OnlineClustering`) gives logits whose
  Sinkhorn-Knopp balanced version (:func:`sinkhorn_knopp`, at ``target_temp``) are the soft
  assignments the student predicts. The head itself is trained by its own loss: the
  cross-entropy of its logits (at ``pred_temp``) against those assignments (reference:
  ``OnlineClustering.forward``). Its gradient reaches only the head (the teacher's tokens are
  computed without gradient, the assignments are detached), so adding it to the student's loss
  trains it as the reference's separate backward does, though with the run's optimizer and lr
  (the reference: its own AdamW, lr 5e-4).
* Predictor (``head.type: cross_attention``, :class:`CrossAttentionPredictor`): the student
  encodes the visible patches only (``encoder_mode: visible``, inverse block masking); queries
  made of a mask token plus each masked position's embedding attend to the student's tokens
  (cross-attention only, no self-attention between queries, as the reference's decoder blocks
  with a context), then a weight-normed linear layer on L2-normalized features (the reference's
  ``L2NormLinear``) gives the logits over the clusters, compared at ``student_temp``.

* Predicting a subset (``masking.predict_fraction``, the reference's
  ``prediction_subsampling`` 0.05, :class:`pretrain.masking.SubsetMasker`): queries are made
  for the predicted positions only (``mask == 1``) and the student's loss is the mean over
  them; the clustering head still sees (and balances over) every teacher token, as the
  reference's teacher head runs on all of them before the predicted ones are selected.

Not reproduced: register tokens (the ViT encoder contract has one class token and no
registers; the class token plays their part as context), RoPE (fixed 2-D sin-cos positions
instead) and the reference's separate clustering optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import (
    ClusteringConfig,
    HeadConfig,
    LossConfig,
    TargetConfig,
    TeacherConfig,
)
from pretrain.encoders.vit import sincos_pos_embed_2d
from pretrain.heads import HEADS, Head
from pretrain.ibot import _weight_normed_last_layer, distribution_statistics, soft_cross_entropy
from pretrain.masking import PREDICTED
from pretrain.targets import TARGETS, TargetOut
from pretrain.teacher import LatentTarget


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int, eps: float = 1e-8) -> torch.Tensor:
    """Balanced soft assignments of ``N`` items to ``K`` clusters, ``[..., N, K]``.

    ``exp(scores)`` (shifted by the per-cluster maximum for stability) is alternately divided
    by its column sums (each cluster's total over the ``N`` items becomes 1) and its row sums
    (each item's assignment becomes a distribution), ``iterations`` times (reference:
    ``sinkhorn_knopp``). The result's rows sum to 1; its columns approach ``N / K`` each as the
    iterations go on. Under data parallelism the column sums run over every rank's items.

    Args:
        scores: Logits divided by the temperature, ``[..., N, K]``.
        iterations: Number of (column, row) normalization rounds.
        eps: Added to every sum.
    """
    m = scores.float()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    shift = m.max(dim=-2, keepdim=True).values
    if distributed:
        torch.distributed.all_reduce(shift, torch.distributed.ReduceOp.MAX)
    m = (m - shift).exp()
    for _ in range(iterations):
        cols = m.sum(dim=-2, keepdim=True)
        if distributed:
            torch.distributed.all_reduce(cols)
        m = m / (cols + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


class OnlineClustering(nn.Module):
    """CAPI's clustering head: ``logits = W normalize(x) (+ b)``, assignments by Sinkhorn-Knopp,
    and the head's own loss (reference: ``OnlineClustering``; weights ~ N(0, 1), zero bias).

    Args:
        in_dim: Token width.
        cfg: Clusters, temperatures, iterations, bias, positionwise balancing.
    """

    def __init__(self, in_dim: int, cfg: ClusteringConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = nn.Linear(in_dim, cfg.num_clusters, bias=cfg.bias)
        nn.init.normal_(self.layer.weight, std=1.0)
        if self.layer.bias is not None:
            nn.init.zeros_(self.layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assignments ``[B, L, K]`` (detached) of tokens ``[B, L, D]``, the head's loss, and
        its logits (detached, for the statistics)."""
        logits = self.layer(F.normalize(x.float(), dim=-1, eps=1e-7))  # [B, L, K]
        sk_in = logits.detach() / self.cfg.target_temp
        if self.cfg.positionwise:  # balanced over the batch at each position: [L, B, K]
            assign = sinkhorn_knopp(sk_in.transpose(0, 1), self.cfg.sinkhorn_iters).transpose(0, 1)
        else:  # balanced over every token at once: [B * L, K]
            assign = sinkhorn_knopp(sk_in.flatten(0, 1), self.cfg.sinkhorn_iters).view_as(logits)
        loss = soft_cross_entropy(assign, logits, self.cfg.pred_temp).mean()
        return assign.detach(), loss, logits.detach()


class _CrossBlock(nn.Module):
    """A pre-norm block whose attention reads only the context: queries from ``x``, keys and
    values from ``context`` (reference: ``Block`` with ``context_dim``), then an MLP."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(
            dim, num_heads, batch_first=True, kdim=context_dim, vdim=context_dim
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@HEADS.register("cross_attention")
class CrossAttentionPredictor(Head):
    """CAPI's predictor: one query per masked patch (mask token + fixed sin-cos position),
    ``depth`` cross-attention blocks over the student's tokens, a final norm and a weight-normed
    linear layer on L2-normalized features to ``out_dim`` logits.

    Args:
        encoder: A ViT (its width, grid and class token).
        cfg: ``depth``, ``dim``, ``num_heads``, ``mlp_ratio``.
        out_dim: Clusters.
        pixel_channels: Unused.
        pred_grid: Unused: one query per patch of the patch grid (the ``online_clusters`` target takes
            no ``target.resolution``).
    """

    requires_full_sequence = False
    patch_grid_only = True
    predicts_subset = True
    equal_counts = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.check_config(cfg, int(encoder.num_features))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        nn.init.normal_(self.mask_token, std=0.02)
        pe = torch.from_numpy(sincos_pos_embed_2d(cfg.dim, *encoder.grid_size)).float()
        self.pos_embed = nn.Parameter(pe.unsqueeze(0), requires_grad=False)  # [1, L, dim]
        self.blocks = nn.ModuleList(
            _CrossBlock(cfg.dim, int(encoder.num_features), cfg.num_heads, cfg.mlp_ratio)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.pred = _weight_normed_last_layer(cfg.dim, out_dim, freeze_gain=False)

    @classmethod
    def check_config(cls, cfg: HeadConfig, width: int) -> None:
        """``head.dim`` splits into ``head.num_heads`` attention heads."""
        if cfg.dim % cfg.num_heads:
            raise ValueError(
                f"head.dim {cfg.dim} is not divisible by head.num_heads {cfg.num_heads}: set "
                "head.num_heads to a divisor of head.dim"
            )

    def no_weight_decay(self) -> set[str]:
        return {"mask_token", "pos_embed"}

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, L, out_dim]`` at the predicted positions (``mask == 1``; zeros
        elsewhere) from the student's tokens ``[B, 1 + K, D]`` (visible-only) or
        ``[B, 1 + L, D]``."""
        b, n = mask.shape
        predicted = mask == PREDICTED  # [B, L]: a boolean mask, or codes with a subset
        counts = predicted.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("the cross-attention predictor needs the same masked count per image")
        idx = predicted.nonzero()[:, 1].view(b, -1)  # [B, M] predicted positions, ascending
        pos = self.pos_embed.expand(b, -1, -1).gather(
            1, idx.unsqueeze(-1).expand(-1, -1, self.pos_embed.shape[-1])
        )
        q = self.mask_token.to(pos.dtype) + pos  # [B, M, dim]
        for blk in self.blocks:
            q = blk(q, tokens)
        logits = self.pred(F.normalize(self.norm(q), dim=-1))  # [B, M, K]
        out = logits.new_zeros(b, n, logits.shape[-1])
        return out.scatter(1, idx.unsqueeze(-1).expand_as(logits), logits)  # [B, L, K]


@dataclass
class ClusterTargetOut(TargetOut):
    """The assignments (``value``, ``[B, L, K]``) and the clustering head's loss."""

    clustering_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # the clustering head's logits [B, L, K]


@TARGETS.register("online_clusters")
class ClusterTarget(LatentTarget):
    """Soft cluster assignments of the EMA teacher's patch tokens (module docstring).

    The teacher is :class:`LatentTarget`'s, read at its final normed output; ``discrete_target``
    because the student's loss is a cross-entropy (``loss.type: cross_entropy``).

    Args:
        cfg: ``cfg.clustering``.
        encoder: The student.
        teacher: The teacher's momentum schedule (``recipe.teacher``).
    """

    discrete_target = True

    def __init__(self, cfg: TargetConfig, encoder: nn.Module, teacher: TeacherConfig) -> None:
        super().__init__(cfg, encoder, teacher)
        self.clustering = OnlineClustering(int(encoder.num_features), cfg.clustering)
        self.out_dim = cfg.clustering.num_clusters

    def forward(self, imgs: torch.Tensor) -> ClusterTargetOut:
        with torch.no_grad():
            tokens = self.teacher.encoder.forward_features(imgs)[:, self.prefix :]  # [B, L, D]
        assign, loss, logits = self.clustering(tokens)
        return ClusterTargetOut(assign, clustering_loss=loss, logits=logits)

    def loss(
        self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor, cfg: LossConfig,
        local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The student's cross-entropy over the masked patches (mean over all of them, as the
        reference's sum over predicted tokens divided by their number) plus the clustering
        head's loss."""
        assert isinstance(tgt, ClusterTargetOut) and tgt.clustering_loss is not None
        ce = soft_cross_entropy(tgt.value, pred, self.cfg.clustering.student_temp)  # [B, L]
        w = mask.to(ce.dtype) if cfg.on == "masked" else torch.ones_like(ce)
        return (ce * w).sum() / w.sum().clamp_min(1.0) + tgt.clustering_loss

    @torch.no_grad()
    def statistics(self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor) -> dict[str, float]:
        """On the masked patches: the std of the clustering logits (collapse), the cosine
        between the student's and the target distributions, and the teacher's momentum."""
        assert isinstance(tgt, ClusterTargetOut) and tgt.logits is not None
        k = tgt.value.shape[-1]
        stats = distribution_statistics(
            pred.reshape(-1, k), self.cfg.clustering.student_temp, tgt.value.reshape(-1, k),
            tgt.logits.reshape(-1, k), mask.reshape(-1).bool(),
        )  # fmt: skip
        return {**stats, "momentum": self.teacher.last_momentum}
