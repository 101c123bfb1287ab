"""iBOT: masked image modeling with an online tokenizer (Zhou et al., "iBOT: Image BERT
Pre-Training with Online Tokenizer", ICLR 2022; reference code: bytedance/ibot).

The online tokenizer is the EMA teacher (:mod:`pretrain.teacher`) with a projection head: the
teacher sees the unmasked global crops, its projected class token and patch tokens are centred
(minus an EMA of the batch mean) and sharpened (a softmax at a low, warmed-up temperature); the
student sees the crops with block-wise masks (:class:`pretrain.masking.IBOTBlockMasker`) as mask
tokens, projects its own tokens with the head it trains, and

* its masked patch tokens predict the teacher's patch distribution at the same position of the
  same crop (cross-entropy, the MIM loss ``L_MIM``, ``lambda2``),
* its class token of each crop predicts the teacher's class distribution of every other crop
  (DINO's cross-view loss ``L_[CLS]``, ``lambda1``; Caron et al., ICCV 2021).

So the recipe is ``target.type: ibot`` (this module's :class:`IBOTTarget`, which holds the teacher,
the student's projection head and the teacher's EMA of it) with ``head.type: identity`` (the
student's tokens go to the target's projection head as they are), ``recipe.global_crops: 2``
and a teacher (``recipe.teacher``, evaluate: teacher as in the paper's released checkpoints).

Local crops (multi-crop, ``recipe.local_crops``; the reference's ViT runs, README:
``--local_crops_number 10``, ``--local_crops_scale 0.05 0.25``, 96 px in ``DataAugmentationiBOT``):
the student alone encodes them, unmasked, with its position embedding interpolated to their
grid (:meth:`pretrain.encoders.base.Encoder.forward_resized`); their class tokens join
:func:`dino_cls_loss` against every global crop of the teacher, never the patch loss
(``iBOTLoss.forward``'s ``student_local_cls``).

Not reproduced: the reference's separate ``shared_head_teacher`` flag (one
``shared_head`` for both), freezing the last layer in the first epoch and the weight-decay
schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from harness.core.config import HeadConfig, IBOTConfig, LossConfig, TargetConfig, TeacherConfig
from pretrain.heads import HEADS, Head
from pretrain.targets import TARGETS, TargetOut
from pretrain.teacher import EMATeacher, LatentTarget, target_std


@HEADS.register("identity")
class IdentityHead(Head):
    """The encoder's tokens as they are, ``[B, P + L, D]``, for a target that applies its own
    projection (iBOT's projection head lives in :class:`IBOTTarget`, next to its EMA copy).
    ``pixel_channels`` and ``pred_grid`` are unused: the tokens stay on the patch grid (the
    ``ibot`` target takes no ``target.resolution``)."""

    requires_full_sequence = True
    patch_grid_only = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        return tokens


def _weight_normed_last_layer(in_dim: int, out_dim: int, freeze_gain: bool) -> nn.Module:
    """DINO's last layer: a bias-free linear layer with weight normalization, gain 1 (frozen
    when ``norm_last_layer``)."""
    layer = weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    gain = layer.parametrizations.weight.original0
    with torch.no_grad():
        gain.fill_(1.0)
    gain.requires_grad_(not freeze_gain)
    return layer


class DINOHead(nn.Module):
    """DINO's projection head with iBOT's patch branch (reference: ``models/head.py``,
    ``DINOHead`` / ``iBOTHead``): an MLP (``num_layers`` linear layers, GELU between, the last
    to ``bottleneck_dim``), L2 normalization, then a weight-normed linear layer to the
    prototypes; the patch tokens share the MLP and, with ``shared_head``, the last layer.

    Args:
        in_dim: Encoder width.
        cfg: Sizes and ``shared_head`` / ``norm_last_layer``.
    """

    def __init__(self, in_dim: int, cfg: IBOTConfig) -> None:
        super().__init__()
        dims = [in_dim] + [cfg.hidden_dim] * (cfg.num_layers - 1) + [cfg.bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < cfg.num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = _weight_normed_last_layer(
            cfg.bottleneck_dim, cfg.out_dim, cfg.norm_last_layer
        )
        self.patch_last_layer = (
            None
            if cfg.shared_head
            else _weight_normed_last_layer(
                cfg.bottleneck_dim, cfg.patch_out_dim, cfg.norm_last_layer
            )
        )

    def forward(self, tokens: torch.Tensor, prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-token and patch logits of tokens ``[N, P + L, D]``: ``[N, K]`` and
        ``[N, L, K_patch]`` (the first prefix token is the class token)."""
        z = F.normalize(self.mlp(tokens), dim=-1)  # [N, P + L, bottleneck]
        patch_layer = self.last_layer if self.patch_last_layer is None else self.patch_last_layer
        return self.last_layer(z[:, 0]), patch_layer(z[:, prefix:])

    def cls_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """Class-token logits of class tokens alone, ``[..., D] -> [..., K]`` (the local
        crops, whose patch tokens no loss reads; the MLP works token by token, so this is
        :meth:`forward`'s class-token output)."""
        return self.last_layer(F.normalize(self.mlp(cls), dim=-1))


def _init_linear(m: nn.Module) -> None:
    """The reference's ``_init_weights``: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Centering(nn.Module):
    """DINO's centre: an EMA of the teacher's mean output, ``c = m * c + (1 - m) * mean(x)``
    (reference: ``iBOTLoss.update_center``; the patch centre averages over every patch token of
    every crop, masked or not). Averaged over ranks under data parallelism.

    Args:
        dim: Output width.
        momentum: ``m``.
    """

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold in the mean of ``x`` ``[..., dim]`` over every leading index."""
        mean = x.detach().float().reshape(-1, x.shape[-1]).mean(dim=0)  # [dim]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(mean)
            mean /= torch.distributed.get_world_size()
        self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)


def teacher_temp_at(step: int, warmup: float, final: float, warmup_steps: int) -> float:
    """The teacher temperature after ``step`` optimizer steps: linear from ``warmup`` to
    ``final`` over ``warmup_steps`` (the reference's per-epoch ``np.linspace``), then ``final``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return final
    return warmup + (final - warmup) * step / warmup_steps


def soft_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """``-sum_k p_k log softmax(s / temp)_k`` over the last dim: ``[..., K] -> [...]``."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(dim=-1)


def dino_cls_loss(student: torch.Tensor, teacher_probs: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's cross-view loss: the student's class token of each crop predicts the teacher's of
    every other global crop, averaged over images and over the pairs.

    The teacher sees the ``G`` global crops only; the student sees them and, after them, any
    local crops (``V - G``, reference: ``iBOTLoss.forward``: ``student_local_cls`` appended,
    every pair ``(q, v)`` of a teacher crop ``q < G`` and a student crop ``v`` with ``v != q``).
    Without local crops that is the ``G * (G - 1)`` pairs of different global crops; with them
    ``G * (V - 1)`` pairs.

    Args:
        student: Student class-token logits ``[B, V, K]``, the global crops first.
        teacher_probs: Teacher distributions ``[B, G, K]`` (centred and sharpened), ``G <= V``.
        temp: Student temperature.
    """
    g, v = teacher_probs.shape[1], student.shape[1]
    if g > v:
        raise ValueError(f"{g} teacher crops but only {v} student crops: the student sees every crop")
    terms = [
        soft_cross_entropy(teacher_probs[:, q], student[:, s], temp).mean()
        for q in range(g)
        for s in range(v)
        if s != q
    ]
    return torch.stack(terms).mean()


def ibot_patch_loss(
    student: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, temp: float
) -> torch.Tensor:
    """iBOT's MIM loss: each masked patch token predicts the teacher's distribution at its
    position in the same crop; per image the mean over its masked patches (0 for an image
    without any), then the mean over images and crops (reference: ``iBOTLoss.forward``).

    Args:
        student: Student patch logits ``[B, V, L, K]``.
        teacher_probs: Teacher distributions ``[B, V, L, K]``.
        mask: ``[B, V, L]`` boolean, True = masked.
        temp: Student temperature.
    """
    ce = soft_cross_entropy(teacher_probs, student, temp)  # [B, V, L]
    w = mask.to(ce.dtype)
    per_image = (ce * w).sum(dim=-1) / w.sum(dim=-1).clamp_min(1.0)  # [B, V]
    return per_image.mean()


@dataclass
class IBOTTargetOut(TargetOut):
    """The teacher's patch distributions (``value``, ``[B, V, L, K_patch]``) and class-token
    distributions (``cls``, ``[B, V, K]``)."""

    cls: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None  # [B, V, L, K_patch], before centring


def distribution_statistics(
    student_logits: torch.Tensor,
    student_temp: float,
    teacher_probs: torch.Tensor,
    teacher_logits: torch.Tensor,
    rows: torch.Tensor,
) -> dict[str, float]:
    """Collapse statistics of a soft target on the selected rows (masked patches): the std of
    the teacher's logits over those rows (:func:`pretrain.teacher.target_std`; near zero when
    every patch gets the same distribution) and the cosine between the student's and the
    teacher's distributions.

    Args:
        student_logits: ``[N, K]``; student_temp: its temperature.
        teacher_probs: ``[N, K]``; teacher_logits: ``[N, K]``.
        rows: ``[N]`` boolean.
    """
    if not bool(rows.any()):
        return {"target_std": float("nan"), "cosine": float("nan")}
    p = F.softmax(student_logits.detach()[rows].float() / student_temp, dim=-1)
    cos = float(F.cosine_similarity(p, teacher_probs[rows].float(), dim=-1).mean())
    return {"target_std": target_std(teacher_logits[rows]), "cosine": cos}


@TARGETS.register("ibot")
class IBOTTarget(LatentTarget):
    """The online tokenizer: the EMA teacher's projected tokens, centred and sharpened, plus
    the student's projection head that the loss trains (its EMA is the teacher's head).

    The teacher is :class:`LatentTarget`'s (its schedule, export choice and run length), read
    at its final normed output; ``discrete_target`` because the loss is a cross-entropy
    (``loss.type: cross_entropy``) against the teacher's soft distributions.

    Args:
        cfg: ``cfg.ibot``: heads, temperatures, centring, loss weights.
        encoder: The student.
        teacher: The teacher's momentum schedule (``recipe.teacher``).
    """

    discrete_target = True
    multi_view = True
    takes_local_crops = True

    def __init__(self, cfg: TargetConfig, encoder: nn.Module, teacher: TeacherConfig) -> None:
        super().__init__(cfg, encoder, teacher)
        c = cfg.ibot
        self.student_head = DINOHead(int(encoder.num_features), c)
        self.teacher_head = EMATeacher(self.student_head, teacher)
        self.cls_center = Centering(c.out_dim, c.center_momentum)
        self.patch_center = Centering(c.patch_out_dim, c.patch_center_momentum)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @classmethod
    def class_token_weights(cls, cfg: TargetConfig) -> dict[str, float]:
        """The DINO class-token loss (``ibot.cls_weight``) besides the latent target's."""
        return {**super().class_token_weights(cfg), "ibot.cls_weight": cfg.ibot.cls_weight}

    def set_run_length(self, total_steps: int) -> None:
        super().set_run_length(total_steps)
        self.teacher_head.total_steps = total_steps

    def after_step(self, encoder: nn.Module, step: int) -> None:
        """EMA updates of the teacher encoder and of the teacher's head; the step count drives
        the temperature warm-up."""
        super().after_step(encoder, step)
        self.teacher_head.update(self.student_head, step)
        self.steps_done.fill_(step)

    def temperatures(self) -> tuple[float, float]:
        """The teacher's class-token and patch temperatures at this step (the warm-up spans
        ``warmup_teacher_temp_fraction`` of the run's steps)."""
        c, s = self.cfg.ibot, int(self.steps_done)
        warm = round(c.warmup_teacher_temp_fraction * self.teacher.total_steps)
        return (
            teacher_temp_at(s, c.warmup_teacher_temp, c.teacher_temp, warm),
            teacher_temp_at(s, c.warmup_teacher_patch_temp, c.teacher_patch_temp, warm),
        )

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> IBOTTargetOut:
        """Teacher distributions of the crops ``[B, V, C, H, W]`` (or one crop ``[B, C, H, W]``):
        centred with the centres before this batch, then the centres take this batch in
        (training only)."""
        views = imgs if imgs.dim() == 5 else imgs.unsqueeze(1)
        b, v = views.shape[:2]
        tokens = self.teacher.encoder.forward_features(views.flatten(0, 1))  # [B*V, 1 + L, D]
        cls, patch = self.teacher_head.encoder(tokens, self.prefix)  # [B*V, K], [B*V, L, Kp]
        cls, patch = cls.float(), patch.float()
        t_cls, t_patch = self.temperatures()
        cls_p = F.softmax((cls - self.cls_center.center) / t_cls, dim=-1)
        patch_p = F.softmax((patch - self.patch_center.center) / t_patch, dim=-1)
        if self.training:
            self.cls_center.update(cls)
            self.patch_center.update(patch)
        return IBOTTargetOut(
            patch_p.view(b, v, *patch_p.shape[1:]),
            cls=cls_p.view(b, v, -1),
            patch_logits=patch.view(b, v, *patch.shape[1:]),
        )

    def loss(
        self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor, cfg: LossConfig,
        local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cls_weight * L_[CLS] + patch_weight * L_MIM`` of the student's tokens ``pred``
        ``[B * V, 1 + L, D]`` (rows ``b * V + v``) against the teacher's distributions; the
        class tokens of the local crops ``local`` ``[B, V_local, D]`` (unmasked, student only)
        join the class-token loss after the global crops (:func:`dino_cls_loss`), never the
        patch loss."""
        assert isinstance(tgt, IBOTTargetOut) and tgt.cls is not None
        c = self.cfg.ibot
        b, v = tgt.cls.shape[:2]
        s_cls, s_patch = self.student_head(pred, self.prefix)  # [B*V, K], [B*V, L, Kp]
        patch = ibot_patch_loss(
            s_patch.view(b, v, *s_patch.shape[1:]), tgt.value, mask.view(b, v, -1), c.student_temp
        )
        loss = c.patch_weight * patch
        student = s_cls.view(b, v, -1)  # [B, V, K]
        if local is not None:  # [B, V + V_local, K]: the global crops first, as iBOTLoss
            student = torch.cat([student, self.student_head.cls_logits(local)], dim=1)
        if c.cls_weight > 0 and student.shape[1] > 1:  # one crop (the mask picture): no pair
            loss = loss + c.cls_weight * dino_cls_loss(student, tgt.cls, c.student_temp)
        return loss

    @torch.no_grad()
    def statistics(self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor) -> dict[str, float]:
        """On the masked patches: the std of the teacher's patch logits (collapse), the cosine
        between the student's and the teacher's distributions, and the teacher's momentum."""
        assert isinstance(tgt, IBOTTargetOut) and tgt.patch_logits is not None
        k = tgt.value.shape[-1]
        _, s_patch = self.student_head(pred.detach(), self.prefix)  # [B*V, L, Kp]
        rows = mask.reshape(-1).bool()
        stats = distribution_statistics(
            s_patch.reshape(-1, k), self.cfg.ibot.student_temp, tgt.value.reshape(-1, k),
            tgt.patch_logits.reshape(-1, k), rows,
        )  # fmt: skip
        return {**stats, "momentum": self.teacher.last_momentum}
