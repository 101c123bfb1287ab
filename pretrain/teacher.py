"""The EMA teacher and the latent targets it computes (data2vec, data2vec 2.0, I-JEPA).

* :class:`EMATeacher`: a copy of the encoder that never receives a gradient (its parameters
  have ``requires_grad = False``, so the engine's optimizer never holds them, and it runs under
  ``no_grad``), always in eval mode (no drop path: data2vec's ``self.ema.model.eval()``),
  updated after each optimizer step ``teacher = m * teacher + (1 - m) * student`` with ``m`` on
  a linear (data2vec's ``get_annealed_rate``, I-JEPA's momentum scheduler) or cosine (BYOL,
  iBOT) schedule from ``momentum`` to ``momentum_end``. It is a submodule of the model, so
  checkpoints hold it and a resumed run continues bitwise.
* :class:`LatentTarget` (``target.type: latent``): the teacher's per-block outputs before the
  final norm on the unmasked image, the last ``top_k`` each normalized (instance / layer / the
  encoder's final norm / none), averaged, then normalized (layer / instance / none). data2vec
  (Baevski et al., ICML 2022; fairseq ``examples/data2vec/models/data2vec_vision.py``,
  ``Data2VecVisionModel.forward``): top 6, layer norm of the average for vision
  (``base_imagenet_d2v1.yaml``); data2vec 2.0 (Baevski et al. 2023; fairseq
  ``examples/data2vec/config/v2/base_images_only_task.yaml``): top 10, instance norm per block,
  layer norm of the average (``layer_norm_targets: true``), and a class-token loss
  (``cls_loss`` 0.01, :meth:`LatentTarget.prefix_loss`); I-JEPA (Assran et al., CVPR 2023; facebookresearch/ijepa
  ``src/train.py``, ``forward_target``): the target encoder's normed output, layer-normed again.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import LossConfig, TargetConfig, TeacherConfig
from harness.core.config.recipe import check_target_encoder, check_top_k
from pretrain.losses import reconstruction_loss
from pretrain.targets import TARGETS, Target, TargetOut


def momentum_at(cfg: TeacherConfig, update: int, total_steps: int) -> float:
    """The momentum ``m`` of the ``update``-th EMA update (0-based).

    Args:
        cfg: The teacher's schedule.
        update: Updates done before this one.
        total_steps: The run's optimizer steps (``momentum_steps: None`` spans them).
    """
    span = cfg.momentum_steps or max(total_steps, 1)
    t = min(update / span, 1.0)
    start, end = cfg.momentum, cfg.momentum_end
    if cfg.schedule == "cosine":
        return end - (end - start) * (1.0 + math.cos(math.pi * t)) / 2.0
    return start + (end - start) * t


def teacher_mix(cfg: TeacherConfig, total_steps: int) -> tuple[float, float]:
    """What the teacher is made of after the run's ``total_steps`` updates: the share of its
    initial weights it still holds (the product of the momenta; each update keeps ``m`` of the
    teacher) and the mean step of the students it averages (update ``k`` adds
    ``(1 - m_k) * prod_{j > k} m_j`` of the student after step ``k + 1``), as a fraction of
    the run.

    A schedule slow for its run leaves the exported teacher part random and centred on an early
    student: the papers' 0.996 start assumes ~10^5 steps (I-JEPA: over 300 ImageNet epochs),
    and 0.99 -> 1.0 over 540 steps keeps 6.7 % of the initialisation and centres on the student
    of about half the run. Returns ``(1.0, nan)`` for a run without updates.
    """
    share, weighted, total = 1.0, 0.0, max(total_steps, 0)
    for k in reversed(range(total)):  # from the last update back: share = prod_{j > k} m_j
        m = momentum_at(cfg, k, total)
        weighted += (1.0 - m) * share * (k + 1)
        share *= m
    if share >= 1.0:
        return share, float("nan")
    return share, weighted / (1.0 - share) / total


class EMATeacher(nn.Module):
    """An exponential moving average of an encoder.

    Args:
        encoder: The student; the teacher starts as its copy.
        cfg: Momentum schedule and what is exported.
    """

    def __init__(self, encoder: nn.Module, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = copy.deepcopy(encoder)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.total_steps = 1
        self.last_momentum = float("nan")

    def train(self, mode: bool = True) -> EMATeacher:
        """The teacher stays in eval mode (no drop path, no dropout) whatever the model's mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """``teacher = m * teacher + (1 - m) * student`` after optimizer step ``step`` (1-based,
        so the first update uses ``momentum``); buffers are copied."""
        m = momentum_at(self.cfg, step - 1, self.total_steps)
        self.last_momentum = m
        t_params = list(self.encoder.parameters())
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - m)  # t + (1 - m) * (s - t)
        for tb, sb in zip(self.encoder.buffers(), student.buffers(), strict=True):
            tb.copy_(sb)

    @torch.no_grad()
    def blocks(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's per-block outputs before the final norm, ``[B, P + L, D]`` each."""
        return self.encoder.forward_blocks(imgs)


def instance_norm_tokens(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each channel normalized over the tokens of its image, ``[B, L, D]`` (``F.instance_norm``
    over ``[B, D, L]``, as data2vec's ``instance_norm_target_layer``)."""
    return F.instance_norm(x.float().transpose(1, 2), eps=eps).transpose(1, 2)


def layer_norm_tokens(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each token normalized over its channels, no affine, ``[B, L, D]``."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def target_std(values: torch.Tensor) -> float:
    """Std of each channel over every row, averaged over channels (data2vec's ``compute_var``:
    ``sqrt(var + 1e-6)``): near zero when every patch gets the same target (collapse)."""
    flat = values.detach().float().reshape(-1, values.shape[-1])
    if flat.shape[0] < 2:
        return float("nan")
    return float(torch.sqrt(flat.var(dim=0) + 1e-6).mean())


def within_image_std(values: torch.Tensor) -> float:
    """Std of each channel over the patches of one image ``[B, L, D]``, averaged over channels
    and images: near zero when every patch of an image gets the same target (a spatial collapse,
    each image one vector), which :func:`target_std` over every patch of the batch misses as long
    as the images differ. Its ratio to :func:`target_std` is the part of the targets' spread that
    lies within images."""
    v = values.detach().float()
    if v.dim() != 3 or v.shape[1] < 2:
        return float("nan")
    return float(v.std(dim=1).mean())


# A latent run whose targets spread within each image less than half as much as over the batch
# (at least about three quarters of their variance one vector per image) is flagged as a
# spatial collapse. Ours: at init a ViT's layer-normed targets sit near 0.75; issue 13's I-JEPA
# demo run ended at 0.29, data2vec's at 0.85 (results/latent_demo/README section).
SPATIAL_COLLAPSE_RATIO = 0.5


def within_to_batch_ratio(history: list[dict[str, float]], last: int = 10) -> float | None:
    """The mean of ``target_std_within / target_std`` over the last ``last`` steps of the run's
    history (one entry per optimizer step) that have both (None when none has: a target without a within-image std, iBOT's or CAPI's
    distributions). Below :data:`SPATIAL_COLLAPSE_RATIO`: a spatial collapse, which the
    batch-wide std alone (the ``collapse_std`` check) does not see."""
    pairs = [(h["target_std_within"], h["target_std"]) for h in history
             if math.isfinite(h.get("target_std_within", math.nan))
             and h.get("target_std", 0.0) > 0.0]  # fmt: skip
    if not pairs:
        return None
    tail = pairs[-last:]
    return sum(w / b for w, b in tail) / len(tail)


def position_share(values: torch.Tensor) -> float:
    """The share of the targets' variance that their position on the grid explains, ``values``
    ``[N, L, D]`` (``N`` images, ``L`` positions): the variance of each position's mean over
    the images divided by the total variance, summed over channels (a one-way ANOVA's
    between-group share, positions as the groups). Near 1 when a patch's target is mostly its
    position (the same vector at that place whatever the image): a predictor told the positions
    can then lower its loss far without reading the context; near 0 when targets vary with the
    image alone."""
    v = values.detach().float()
    if v.dim() != 3 or v.shape[0] < 2:
        return float("nan")
    total = v.reshape(-1, v.shape[-1]).var(dim=0, unbiased=False).sum()
    between = v.mean(dim=0).var(dim=0, unbiased=False).sum()  # [L, D] position means
    return float(between / total) if total > 0 else float("nan")


@TARGETS.register("latent")
class LatentTarget(Target):
    """Features of an EMA teacher of the encoder, one ``D``-vector per patch.

    Args:
        cfg: ``cfg.latent``: ``top_k``, ``block_norm``, ``target_norm``.
        encoder: The student (an isotropic family: ViT, BEiT).
        teacher: The teacher's schedule.
    """

    needs_teacher = True

    def __init__(self, cfg: TargetConfig, encoder: nn.Module, teacher: TeacherConfig) -> None:
        super().__init__(cfg, int(encoder.patch_size), tuple(encoder.grid_size))  # type: ignore[arg-type]
        name = f"the {encoder.family} encoder"
        check_target_encoder(cfg, bool(encoder.isotropic), int(encoder.num_prefix_tokens),
                             "target", name)  # fmt: skip
        check_top_k(cfg.latent.top_k, int(encoder.num_layers), "target.latent", name)
        self.teacher = EMATeacher(encoder, teacher)
        self.prefix = int(encoder.num_prefix_tokens)
        self.out_dim = int(encoder.num_features)

    @classmethod
    def class_token_weights(cls, cfg: TargetConfig) -> dict[str, float]:
        """data2vec 2.0's class-token regression (``latent.cls_weight``)."""
        return {"latent.cls_weight": cfg.latent.cls_weight}

    @classmethod
    def from_encoder(
        cls, cfg: TargetConfig, encoder: nn.Module, teacher: TeacherConfig | None = None
    ) -> Target:
        if teacher is None:
            raise ValueError("target 'latent' needs recipe.teacher (its EMA teacher's schedule)")
        return cls(cfg, encoder, teacher)

    def set_run_length(self, total_steps: int) -> None:
        self.teacher.total_steps = total_steps

    def after_step(self, encoder: nn.Module, step: int) -> None:
        self.teacher.update(encoder, step)

    def exported_encoder(self, encoder: nn.Module) -> tuple[str, nn.Module]:
        if self.teacher.cfg.evaluate == "teacher":
            return "teacher", self.teacher.encoder
        return "student", encoder

    def _block_norm(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.latent.block_norm
        if kind == "instance":
            return instance_norm_tokens(x)
        if kind == "layer":
            return layer_norm_tokens(x)
        if kind == "final":
            return self.teacher.encoder.final_norm(x).float()
        return x.float()

    def _target_norm(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.cfg.latent.target_norm
        if kind == "layer":
            return layer_norm_tokens(x)
        if kind == "instance":
            return instance_norm_tokens(x)
        return x

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> TargetOut:
        blocks = self.teacher.blocks(imgs)[-self.cfg.latent.top_k :]
        # the patch tokens of each block, [B, L, D]; prefix (class) tokens are not predicted
        normed = [self._block_norm(b[:, self.prefix :]) for b in blocks]
        avg = torch.stack(normed).mean(dim=0)  # [B, L, D]
        return TargetOut(self._target_norm(avg))

    def prefix_loss(
        self, tokens: torch.Tensor, tgt: TargetOut, cfg: LossConfig
    ) -> torch.Tensor | None:
        """data2vec 2.0's class-token loss (``data2vec2.py`` ``Data2VecMultiModel.forward``,
        ``cls_loss``): the student's class token regresses the mean of its image's patch
        targets under the recipe's loss (``d2v_loss``), summed over the batch's images and
        weighted by ``cls_weight`` (the reference multiplies it by the masked-token count its
        criterion then divides by, so it is a sum over images beside a mean over masked
        patches). None when ``cls_weight`` is 0."""
        w = self.cfg.latent.cls_weight
        if w == 0:
            return None
        pred = tokens[:, :1].float()  # [B, 1, D] the student's class token
        target = tgt.value.float().mean(dim=1, keepdim=True)  # [B, 1, D]
        ones = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        return w * pred.shape[0] * reconstruction_loss(pred, target, ones, cfg)

    def statistics(self, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor) -> dict[str, float]:
        """The target's std over the masked patches (collapse: near zero), its std within each
        image (:func:`within_image_std`; spatial collapse: near zero) and the cosine between
        prediction and target at the masked patches."""
        sel = mask.bool()
        t, p = tgt.value[sel].float(), pred.detach()[sel].float()  # [M, D]
        cos = float(F.cosine_similarity(p, t, dim=-1).mean()) if len(t) else float("nan")
        return {
            "target_std": target_std(t),
            "target_std_within": within_image_std(tgt.value),
            "cosine": cos,
        }
