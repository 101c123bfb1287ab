"""One model class for every recipe: masker + encoder + head + target + loss.

The ablation axes of the papers are config values here, not code paths: the masker
(:mod:`pretrain.masking`), whether the encoder sees mask tokens or only visible patches (and
whether masked embeddings are corrupted, ViT's masked patch prediction), the head
(:mod:`pretrain.heads`), the target (:mod:`pretrain.targets`), the loss (:mod:`pretrain.losses`),
and an optional adversarial loss (Context Encoder). The recipe modules register their parts
(importing :mod:`pretrain` imports them all); the recipes' values are their recipe files
(:mod:`pretrain.recipes`):

==================  ==============================================================
SimMIM              :mod:`pretrain.simmim` (linear head), ViT or Swin (:mod:`pretrain.encoders`)
MAE                 :mod:`pretrain.mae` (decoder), ``encoder_mode: visible``
BEiT                :mod:`pretrain.beit` (tokens), :mod:`pretrain.tokenizers`, :mod:`pretrain.dall_e`
MaskFeat            :mod:`pretrain.maskfeat` (HOG)
ViT MPP             :mod:`pretrain.vit_mpp` (corruption, mean color)
Context Encoder     :mod:`pretrain.context_encoder` (up-conv head, discriminator), conv encoder
data2vec, I-JEPA    :mod:`pretrain.teacher` (EMA teacher, latent targets)
iBOT                :mod:`pretrain.ibot` (EMA teacher + projection heads, two crops, per-image masks)
CAPI                :mod:`pretrain.capi` (online clustering, Sinkhorn-Knopp, cross-attention head)
data2vec 2.0        :mod:`pretrain.data2vec2` (conv decoder), clones sharing one teacher pass
iGPT                :mod:`pretrain.encoders.igpt` (pixel tokens), ``color_clusters`` target,
                    ``bernoulli`` (BERT) or ``raster`` (autoregressive, causal) masking
Selfie              :mod:`pretrain.selfie` (patch choice among the masked patches), conv encoder
Context prediction  :mod:`pretrain.context_prediction` (relative position of patch pairs)
==================  ==============================================================

Selfie and context prediction encode image patches one by one and classify, which is not the
masker + encoder + head + target pipeline: each registers a subclass of :class:`MIMModel` for its
target type (:func:`register_model`), which :func:`create_model` builds for that target.

Hooks instead of flags: the target is built from the encoder (:meth:`Target.from_encoder`), the
engine calls :meth:`MIMModel.after_step` once per optimizer step (an EMA teacher's update), the
encoder, head and target each report their no-weight-decay names, and ``recipe.encoder_init``
names the encoder's initialisation (:data:`harness.core.config.axes.ENCODER_INITS`, the rules
of :mod:`pretrain.inits`). The engine also tells the model the run's length
(:meth:`MIMModel.set_run_length`, a momentum schedule), asks it which encoder to export
(:meth:`MIMModel.exported_encoder`: the student or an EMA teacher) and logs the target's statistics (:attr:`MIMOutput.stats`, collapse of a latent target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import pretrain.context_encoder as ce
import pretrain.inits  # noqa: F401  (registers the encoder initialisations)
from harness.core.config import EncoderConfig, RecipeConfig
from harness.core.config.axes import ENCODER_INITS
from harness.core.config.recipe import check_local_crops_fit
from harness.core.errors import CheckpointError
from pretrain.encoders import ENCODERS, create_encoder
from pretrain.encoders.conv import mask_to_pixels
from pretrain.heads import HEADS
from pretrain.masking import (
    MASKERS,
    Masker,
    SubsetMasker,
    ViewMasker,
    create_masker,
    mask_to_indices,
)
from pretrain.targets import TARGETS, ImageSampler, TargetOut, to_unit
from pretrain.vit_mpp import corrupt_and_encode

__all__ = ["HEADS", "MODELS", "MIMModel", "MIMOutput", "create_model", "register_model"]


@dataclass
class MIMOutput:
    """What one forward returns."""

    loss: torch.Tensor
    pred: torch.Tensor  # [B, L', out_dim] (L': cells of the target's prediction grid)
    target: torch.Tensor  # [B, L', P] values or [B, L', G] class indices
    mask: torch.Tensor  # [B, L]
    target_mean: torch.Tensor | None = None  # [B, L, 1] for norm_pixels
    target_std: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # loss terms (detached)
    stats: dict[str, float] = field(default_factory=dict)  # target statistics (latent targets)


class MIMModel(nn.Module):
    """Masked image modeling from a recipe.

    Args:
        encoder_cfg: The encoder to pretrain (ViT, Swin or the Context Encoder's conv net).
        recipe: Masking, encoder mode, head, target and loss.
    """

    def __init__(self, encoder_cfg: EncoderConfig, recipe: RecipeConfig) -> None:
        super().__init__()
        self.recipe = recipe
        self.causal = bool(MASKERS.get(recipe.masking.strategy).causal)
        self.encoder = create_encoder(encoder_cfg, options=self._encoder_options(encoder_cfg))
        init = ENCODER_INITS.get(recipe.encoder_init)
        init.check_family(recipe.encoder_init, self.encoder.family)
        init.apply(self.encoder)
        # a target with an EMA teacher (validated: recipe.teacher is set) gets its schedule
        teacher = {"teacher": recipe.teacher} if recipe.teacher is not None else {}
        self.target = TARGETS.get(recipe.target.type).from_encoder(
            recipe.target, self.encoder, **teacher
        )
        if recipe.encoder_mode == "visible" and not self.encoder.visible_only:
            raise ValueError(
                f"encoder_mode 'visible' needs a ViT encoder (no relative position bias); "
                f"'{encoder_cfg.arch}' is a "
                f"{self.encoder.family} encoder ({self.encoder.full_grid_reason}): use "
                "encoder_mode: mask_token"
            )
        self._check_codebook()
        check_local_crops_fit(recipe, encoder_cfg, "recipe")  # the validation's rule, again
        self.head = HEADS.get(recipe.head.type)(
            self.encoder,
            recipe.head,
            self.target.out_dim,
            self.target.pixel_channels,
            pred_grid=tuple(self.target.pred_grid),
        )
        if recipe.encoder_mode == "visible" and self.head.requires_full_sequence:
            raise ValueError(
                f"head '{recipe.head.type}' predicts from every token, so it needs "
                "encoder_mode: mask_token (visible-only encoding leaves masked positions empty)"
            )
        m = recipe.masking
        self.corrupt = m.mask_token_prob < 1.0 or m.random_token_prob > 0.0
        if self.corrupt and not self.encoder.token_input:
            raise ValueError(
                "masking.mask_token_prob / random_token_prob need a ViT or Swin encoder"
            )
        base: Masker | SubsetMasker = create_masker(
            m, self.encoder.grid_size, self.encoder.patch_size
        )
        if m.predict_fraction < 1.0:  # codes [B, L]: a random subset of the masked is predicted
            base = SubsetMasker(base, m.predict_fraction)
        self.masker: Masker | SubsetMasker | ViewMasker = base
        if recipe.global_crops > 1:  # [B, V, L]: one mask per view
            self.masker = ViewMasker(base, recipe.global_crops)
        self.clones = recipe.clone_batch
        if self.clones > 1:  # [B, C, L]: one mask per clone (validated: not with views)
            self.masker = ViewMasker(base, self.clones)
        self.discriminator = (
            ce.Discriminator(int(encoder_cfg.img_size)) if recipe.loss.adv_weight > 0 else None  # type: ignore[arg-type]
        )

    def _encoder_options(self, cfg: EncoderConfig) -> dict[str, bool] | None:
        """``{'causal': True}`` for a causal masker (iGPT's autoregressive objective), whose
        encoder family must have causal attention; else the family's defaults."""
        if not self.causal:
            return None
        if "causal" not in ENCODERS.get(cfg.family).option_defaults:
            raise ValueError(
                f"masking.strategy '{self.recipe.masking.strategy}' predicts every token from the "
                f"ones before it, which needs causal attention; a {cfg.family} encoder "
                f"('{cfg.arch}') has none: use an igpt encoder (arch igpt_*)"
            )
        return {"causal": True}

    def _check_codebook(self) -> None:
        """An encoder that reads colour-cluster ids needs a target that fits them at its input
        resolution (``color_clusters`` with the encoder's number of clusters)."""
        enc = self.encoder
        if not enc.tokenizes_pixels:
            return
        t = self.recipe.target
        vocab = int(enc.palette.shape[0])
        if t.type != "color_clusters" or t.clusters != vocab or self.target.pool != 1:
            raise ValueError(
                f"a {enc.family} encoder reads each pixel as one of {vocab} colour clusters, which "
                f"the color_clusters target fits: set target.type: color_clusters, "
                f"target.clusters: {vocab} and target.resolution: null (got {t.type}, "
                f"{t.clusters} clusters, resolution {t.resolution})"
            )

    def check_restored(self, source: str) -> None:
        """After a checkpoint's state was loaded: refuse one whose colour-cluster codebook, which
        the encoder reads, was never fitted (nothing is written before this check).

        Raises:
            CheckpointError: naming the checkpoint and the fix.
        """
        if not self.encoder.codebook_fitted:
            raise CheckpointError(
                f"{source} holds a {self.encoder.family} encoder whose colour-cluster codebook "
                "was never fitted (it is fitted before the first step of a fresh run), so the "
                "run cannot resume from it: delete the checkpoint to start the run afresh"
            )

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norm weights: what the
        encoder, the head and the target each report, under their prefixes."""
        parts: dict[str, set[str]] = {
            "encoder": self.encoder.no_weight_decay(),
            "head": self.head.no_weight_decay(),
            "target": self.target.no_weight_decay(),
        }
        return {f"{prefix}.{n}" for prefix, names in parts.items() for n in names}

    def after_step(self, step: int) -> None:
        """The after-optimizer-step hook: the engine calls it once after every optimizer step
        with the number of steps done (an EMA teacher target updates itself from the encoder
        here); the parts decide, by default nothing happens."""
        self.target.after_step(self.encoder, step)

    def set_run_length(self, total_steps: int) -> None:
        """The engine tells the parts once how many optimizer steps the run has (an EMA
        teacher's momentum schedule spans them)."""
        self.target.set_run_length(total_steps)

    def exported_encoder(self) -> tuple[str, nn.Module]:
        """The encoder the run exports and every task evaluates, and its name: the student,
        or an EMA teacher where the recipe says so (``recipe.teacher.evaluate``)."""
        return self.target.exported_encoder(self.encoder)

    def prepare(self, sample_images: ImageSampler, log: Callable[[str], None] = print) -> None:
        """Fit what the target needs before pretraining (a tokenizer); the engine calls it once,
        before the first step of a fresh run (a resumed run restores it from the checkpoint)."""
        self.target.prepare(sample_images, log)
        if self.encoder.tokenizes_pixels:  # iGPT: the encoder reads the palette just fitted
            codebook = self.target.pixel_codebook()
            if codebook is None:
                raise ValueError("the color_clusters target did not fit its palette")
            self.encoder.set_codebook(codebook)

    def encode(
        self, imgs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder tokens under the recipe's mode, and ``ids_restore`` for visible-only encoding."""
        if self.recipe.encoder_mode == "visible":
            ids_keep, ids_restore = mask_to_indices(mask)
            return self.encoder.forward_visible(imgs, ids_keep), ids_restore  # [B, 1 + K, D]
        if self.corrupt:
            return corrupt_and_encode(self.encoder, imgs, mask, self.recipe.masking), None
        return self.encoder.forward_features(imgs, mask), None  # [B, P + h*w, C]

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor, local: torch.Tensor | None = None
    ) -> MIMOutput:
        """Encode with the recipe's mode, predict, and compute the loss.

        Args:
            imgs: Normalized images ``[B, C, H, W]``, or ``[B, V, C, H, W]``: ``V`` views of each
                image (``recipe.global_crops``) for a target that compares views.
            mask: ``[B, L]`` boolean, True = masked, or ``[B, V, L]`` with views.
            local: The local crops ``[B, V_local, C, h, w]`` (``recipe.local_crops``, a target
                that ``takes_local_crops``): the student alone encodes them, unmasked, at their
                own size (:meth:`~pretrain.encoders.base.Encoder.forward_resized`), and the
                target's loss gets their class tokens ``[B, V_local, D]``; None: none.

        With views, the encoder and head see the ``B * V`` views as one batch (``pred``
        ``[B * V, ...]``, row ``b * V + v`` for view ``v`` of image ``b``) and the target gets
        them as ``[B, V, C, H, W]``; a single image batch with view masks (the reconstruction
        picture) uses each image's first mask. With clones (``recipe.clone_batch`` ``C``, masks
        ``[B, C, L]``) the student sees each image ``C`` times (row ``b * C + c``), each with
        its own mask, and the target is computed once per image and repeated for its clones
        (data2vec 2.0's ``clone_batch``: one teacher pass shared by the clones).
        """
        target_in = imgs
        clones = 1
        if imgs.dim() == 5:
            imgs, mask = imgs.flatten(0, 1), mask.flatten(0, 1)  # [B * V, C, H, W], [B * V, L]
        elif mask.dim() == 3 and self.clones > 1:
            clones = mask.shape[1]
            imgs, mask = imgs.repeat_interleave(clones, 0), mask.flatten(0, 1)  # [B * C, ...]
        elif mask.dim() == 3:
            mask = mask[:, 0]
        hidden, predicted = mask != 0, mask == 1  # the same as mask for a boolean mask
        tokens, ids_restore = self.encode(imgs, hidden)
        pred = self.head(tokens, mask, ids_restore)  # [B (* V or C), L', out_dim]
        tgt = _repeat_rows(self.target(target_in), clones)
        loss = self.target.loss(pred, tgt, predicted, self.recipe.loss, self._local_cls(local))
        parts = {"rec": loss.detach()}
        prefix = self.target.prefix_loss(tokens, tgt, self.recipe.loss)
        if prefix is not None:  # data2vec 2.0's class-token loss
            loss = loss + prefix
            parts["cls"] = prefix.detach()
        if self.discriminator is not None:
            w = self.recipe.loss.adv_weight
            g_adv, d_loss = ce.adversarial_losses(
                self.discriminator, imgs, self._paste(imgs, pred, tgt, hidden)
            )
            loss = (1.0 - w) * loss + w * g_adv + d_loss
            parts |= {"adv_g": g_adv.detach(), "adv_d": d_loss.detach()}
        stats = self.target.statistics(pred, tgt, predicted)
        return MIMOutput(loss, pred, tgt.value, mask, tgt.mean, tgt.std, parts, stats)

    def _local_cls(self, local: torch.Tensor | None) -> torch.Tensor | None:
        """The student's class tokens of the local crops ``[B, V_local, C, h, w]``:
        ``[B, V_local, D]`` (None without local crops)."""
        if local is None or local.shape[1] == 0:
            return None
        tokens = self.encoder.forward_resized(local.flatten(0, 1))  # [B * V_local, 1 + l, D]
        return tokens[:, 0].view(*local.shape[:2], -1)

    def _paste(
        self, imgs: torch.Tensor, pred: torch.Tensor, tgt: TargetOut, mask: torch.Tensor
    ) -> torch.Tensor:
        """The input with the predicted pixels in the masked region (normalized space)."""
        p = pred.float()
        if tgt.mean is not None and tgt.std is not None:
            p = p * tgt.std + tgt.mean
        rec = self.encoder.unpatchify(p.to(imgs.dtype))
        pm = mask_to_pixels(mask, self.encoder.patch_size, self.encoder.grid_size).to(imgs.dtype)
        return imgs * (1.0 - pm) + rec * pm

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, out: MIMOutput) -> list[tuple[str, torch.Tensor]]:
        """Rows of the reconstruction picture, each ``[B, 3, H, W]`` in [0, 1]: original, masked
        input, then what makes sense for the target (pixels: prediction and prediction pasted
        into the visible patches; HOG, colors, tokens: the target and the prediction drawn)."""
        if out.mask.shape[0] > imgs.shape[0]:  # clones: each image's first clone
            c = out.mask.shape[0] // imgs.shape[0]
            out = dataclasses.replace(out, **{
                f.name: v[::c] for f in dataclasses.fields(out)
                if isinstance(v := getattr(out, f.name), torch.Tensor) and v.dim() > 0
            })  # fmt: skip
        orig = to_unit(imgs.float())
        p, g = self.encoder.patch_size, self.encoder.grid_size
        pm = mask_to_pixels(out.mask == 1, p, g).to(orig)  # predicted: grey
        po = mask_to_pixels(out.mask > 1, p, g).to(orig)  # neither seen nor predicted: dark
        rows = [("original", orig), ("masked", orig * (1 - pm - po) + 0.5 * pm + 0.15 * po)]
        tgt = TargetOut(out.target, out.target_mean, out.target_std)
        pred = self.target.pred_image(out.pred, tgt)
        target = self.target.target_image(tgt)
        if pred is None:
            return rows
        if target is None:  # pixel targets: the prediction, and pasted into the visible input
            return [*rows, ("prediction", pred), ("pasted", orig * (1 - pm) + pred * pm)]
        rows += [("target", target), ("prediction", target * (1 - pm) + pred * pm)]
        if self.causal and self.encoder.tokenizes_pixels:
            rows.append(("completion", self.complete_bottom_half(imgs)))
        return rows

    @torch.no_grad()
    def complete_bottom_half(self, imgs: torch.Tensor) -> torch.Tensor:
        """iGPT's completions (Sec. 4, Fig. 1): the clustered top half of each image and the
        bottom half generated pixel by pixel, most likely cluster first, ``[B, 3, H, W]`` in
        [0, 1]."""
        enc = self.encoder
        if imgs.dim() == 5:
            imgs = imgs[:, 0]
        ids = enc.token_ids(imgs)  # [B, L]
        full = torch.ones_like(ids, dtype=torch.bool)
        done = enc.complete(ids, ids.shape[1] // 2, lambda t: self.head(t, full, None))
        h, w = enc.grid_size
        return enc.palette[done].view(-1, h, w, 3).permute(0, 3, 1, 2).float()


#: ``recipe.target.type`` -> the model class of a recipe whose objective is not the masker +
#: encoder + head + target pipeline (Selfie, context prediction); every other target:
#: :class:`MIMModel`.
MODELS: dict[str, type[MIMModel]] = {}


def register_model(target_type: str) -> Callable[[type[MIMModel]], type[MIMModel]]:
    """Register a :class:`MIMModel` subclass as the model of recipes with ``target_type``."""

    def _add(cls: type[MIMModel]) -> type[MIMModel]:
        if target_type in MODELS:
            raise ValueError(f"a model is already registered for target '{target_type}'")
        MODELS[target_type] = cls
        return cls

    return _add


def _repeat_rows(tgt: TargetOut, clones: int) -> TargetOut:
    """A target of ``B`` images for their ``B * clones`` clones: every per-image tensor field
    repeated ``clones`` times in place (row ``b * clones + c``); scalars (a target's own loss)
    are kept once."""
    if clones == 1:
        return tgt
    b = tgt.value.shape[0]
    return dataclasses.replace(tgt, **{
        f.name: v.repeat_interleave(clones, 0) for f in dataclasses.fields(tgt)
        if isinstance(v := getattr(tgt, f.name), torch.Tensor) and v.dim() > 0 and len(v) == b
    })  # fmt: skip


def create_model(encoder_cfg: EncoderConfig, recipe: RecipeConfig) -> MIMModel:
    """The pretraining model of a recipe (its target's registered model, else :class:`MIMModel`)."""
    return MODELS.get(recipe.target.type, MIMModel)(encoder_cfg, recipe)
