"""Selfie: Self-supervised Pretraining for Image Embedding (Trinh, Luong, Le, 2019,
arXiv:1906.02940).

Masked patches are predicted by choosing, for each masked location, the right patch among the
masked patches of the same image (the others are its distractors), with a cross-entropy over
those candidates (the paper's contrastive loss, after CPC):

* Patch network (the paper: the first three blocks of ResNet-50 on each patch): here the
  encoder of the encoder contract applied to each patch on its own, which needs a convolutional
  encoder (:class:`pretrain.encoders.conv.ConvEncoder`; config validation refuses a ViT or Swin,
  whose input size is fixed). A patch is a masking unit of ``recipe.masking.mask_patch_size``
  px (the paper: 8 px patches on 32 px images, 32 px on 224 px); its embedding is the mean of
  the encoder's output map over the patch (:func:`pool_patches`).
* Attention pooling network (:class:`AttentionPooling`, ``head.type: attention_pooling``): a
  learned vector ``u0`` and the visible patches' embeddings, each plus its position embedding
  (the paper's factorised row + column embeddings), go through transformer blocks; the output
  at ``u0`` summarises the visible patches. The query of masked location ``i`` is that summary
  plus the position embedding of ``i``.
* Scores: dot products of each query with the embeddings of the image's masked patches
  (candidates in the order of their locations, so the right answer of query ``i`` is
  candidate ``i``); the loss is the cross-entropy over the candidates (:func:`selfie_loss`).

Patch and candidate embeddings go through one shared linear map to the pooling width
(``head.dim``). What is transferred to downstream tasks is what the paper reuses: the patch
network's convolutional weights (the encoder file holds the conv encoder, which the tasks then
apply to the whole image); the pooling network is dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from harness.core.config import EncoderConfig, HeadConfig, RecipeConfig
from pretrain.encoders.conv import mask_to_pixels
from pretrain.heads import HEADS, Head
from pretrain.masking import Masker
from pretrain.model import MIMModel, MIMOutput, register_model
from pretrain.targets import TARGETS, Target, TargetOut, patchify, to_unit, unpatchify


def cut_patches(imgs: torch.Tensor, unit: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B * U, C, unit, unit]``: the image's patches, row-major."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // unit, unit, w // unit, unit)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, unit, unit)


def pool_patches(encoder: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """The encoder run on each patch alone, its output map averaged: ``[N, C, p, p] -> [N, D]``."""
    return encoder.forward_features(patches).mean(dim=1)  # [N, h*w, D] -> [N, D]


def masked_order(units: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked and the visible unit indices of each image, each in location order.

    Args:
        units: ``[B, U]`` bool, True = masked, ``num_masked`` per image.
        num_masked: Masked units per image.

    Returns:
        ``([B, M], [B, U - M])`` long.
    """
    order = torch.argsort((~units).to(torch.int8), dim=1, stable=True)  # masked first
    return order[:, :num_masked], order[:, num_masked:]


def selfie_loss(scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the candidates: query ``i``'s right candidate is candidate ``i``.

    Args:
        scores: ``[B, M, M]``, query ``i`` (row) against candidate ``j`` (column).
    """
    b, m, _ = scores.shape
    right = torch.arange(m, device=scores.device).repeat(b)  # [B * M]
    return F.cross_entropy(scores.float().flatten(0, 1), right)


@TARGETS.register("selfie")
class SelfieTarget(Target):
    """The index of the right patch among the masked patches of the image (class ``i`` for the
    ``i``-th masked location); the model computes it (:class:`SelfieModel`)."""

    discrete_target = True
    patchwise_encoder = True

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        raise NotImplementedError("the Selfie target is the masked order, built by SelfieModel")


@HEADS.register("attention_pooling")
class AttentionPooling(Head):
    """Selfie's attention pooling network: transformer blocks over ``u0`` and the visible
    patches (with position embeddings), the output at ``u0`` plus each masked location's
    position embedding as its query, dot products with the candidates.

    Args:
        encoder: The conv encoder (its width; its patch grid bounds the position tables).
        cfg: ``depth``, ``dim``, ``num_heads``, ``mlp_ratio``.
        out_dim: Unused (the scores are one per candidate).
        pixel_channels: Unused.
        pred_grid: Unused.
    """

    # never offered for encoder_mode 'visible': it reads no encoder tokens (its model encodes
    # the patches itself), so it is no answer to a recipe that encodes visible patches only
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
        side = int(max(encoder.grid_size))  # the unit grid is at most the patch grid
        self.embed = nn.Linear(int(encoder.num_features), cfg.dim)
        self.row = nn.Parameter(torch.randn(side, cfg.dim) * 0.02)
        self.col = nn.Parameter(torch.randn(side, cfg.dim) * 0.02)
        self.u0 = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(
            *[Block(cfg.dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.dim)

    def no_weight_decay(self) -> set[str]:
        return {"row", "col", "u0"}

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Factorised position embeddings of a ``grid`` of units, ``[gh * gw, dim]``."""
        gh, gw = grid
        return (self.row[:gh, None] + self.col[None, :gw]).reshape(gh * gw, -1)

    def score(
        self, emb: torch.Tensor, units: torch.Tensor, grid: tuple[int, int], num_masked: int
    ) -> torch.Tensor:
        """Scores ``[B, M, M]`` of each masked location's query against the candidates.

        Args:
            emb: Patch embeddings ``[B, U, C]`` from the patch network.
            units: ``[B, U]`` bool, True = masked.
            grid: The unit grid ``(gh, gw)``.
            num_masked: ``M``, masked units per image.
        """
        e = self.embed(emb)  # [B, U, D]
        pos = self.positions(grid)  # [U, D]
        masked, visible = masked_order(units, num_masked)
        d = e.shape[-1]
        ctx = torch.gather(e + pos, 1, visible[..., None].expand(-1, -1, d))  # [B, U-M, D]
        x = self.blocks(torch.cat([self.u0.expand(e.shape[0], -1, -1), ctx], dim=1))
        u = self.norm(x[:, 0])  # [B, D]
        queries = u[:, None] + pos[masked]  # [B, M, D]
        cands = torch.gather(e, 1, masked[..., None].expand(-1, -1, d))  # [B, M, D]
        return torch.einsum("bmd,bnd->bmn", queries, cands)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError("Selfie's pooling network scores through SelfieModel.score")


@register_model("selfie")
class SelfieModel(MIMModel):
    """Selfie from a recipe: the masker's units are the patches; the conv encoder embeds each
    patch alone, the attention pooling head scores the candidates.

    Args:
        encoder_cfg: A conv encoder (config validation refuses others).
        recipe: ``masking`` (units of ``mask_patch_size`` px, a fixed count per image: the
            ``random`` strategy), ``head`` (the pooling network), ``target.type: selfie``,
            ``loss.type: cross_entropy``.
    """

    def __init__(self, encoder_cfg: EncoderConfig, recipe: RecipeConfig) -> None:
        super().__init__(encoder_cfg, recipe)
        if not isinstance(self.masker, Masker) or self.masker.per_image_ratio:
            raise ValueError("Selfie needs one view and the same masked count in every image")
        self.unit = self.masker.scale * int(self.encoder.patch_size)
        self.unit_grid: tuple[int, int] = tuple(self.masker.unit_grid)  # type: ignore[assignment]
        self.num_masked = int(self.masker.units_masked)

    def units(self, mask: torch.Tensor) -> torch.Tensor:
        """The patch mask ``[B, L]`` on the unit grid, ``[B, U]`` bool."""
        s = self.masker.scale  # type: ignore[union-attr]
        gh, gw = self.encoder.grid_size
        return (mask != 0).view(mask.shape[0], gh, gw)[:, ::s, ::s].reshape(mask.shape[0], -1)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Every unit of every image through the patch network: ``[B, U, C]``."""
        b = imgs.shape[0]
        return pool_patches(self.encoder, cut_patches(imgs, self.unit)).view(b, -1, self.encoder.num_features)

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor, local: torch.Tensor | None = None
    ) -> MIMOutput:
        """Scores ``[B, M, M]`` as ``pred``, the right candidates ``[B, M]`` as ``target``
        (``local``: none, validation refuses local crops for this target)."""
        units = self.units(mask)
        emb = self.embed_patches(imgs)
        scores = self.head.score(emb, units, self.unit_grid, self.num_masked)
        loss = selfie_loss(scores)
        right = torch.arange(self.num_masked, device=imgs.device).expand(imgs.shape[0], -1)
        with torch.no_grad():
            acc = (scores.argmax(-1) == right).float().mean()
        return MIMOutput(loss, scores, right, mask, parts={"rec": loss.detach(), "acc": acc})

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, out: MIMOutput) -> list[tuple[str, torch.Tensor]]:
        """Rows: original (the truth), masked input, and the chosen patch placed back at each
        masked location (a wrong choice framed red)."""
        orig = to_unit(imgs.float())
        pm = mask_to_pixels(out.mask != 0, self.encoder.patch_size, self.encoder.grid_size).to(orig)
        rows = [("original", orig), ("masked", orig * (1 - pm) + 0.5 * pm)]
        return [*rows, ("chosen", self.chosen_image(orig, out))]

    def chosen_image(self, orig: torch.Tensor, out: MIMOutput) -> torch.Tensor:
        """``orig`` with each masked location holding the candidate its query scored highest."""
        b, u = orig.shape[0], self.unit
        patches = patchify(orig, u)  # [B, U, u*u*3]
        masked, _ = masked_order(self.units(out.mask), self.num_masked)
        pick = out.pred.argmax(-1)  # [B, M] candidate index
        src = torch.gather(masked, 1, pick)  # [B, M] unit index of the chosen patch
        width = patches.shape[-1]
        chosen = torch.gather(patches, 1, src[..., None].expand(-1, -1, width))
        wrong = (pick != torch.arange(self.num_masked, device=pick.device)).view(b, -1, 1)
        framed = unpatchify(chosen.reshape(-1, 1, width), u, (1, 1)).clone()  # [B*M, 3, u, u]
        red = torch.tensor([1.0, 0.0, 0.0], device=orig.device).view(1, 3, 1)
        frame = wrong.reshape(-1, 1, 1).to(orig)
        for edge in (framed[:, :, 0], framed[:, :, -1], framed[:, :, :, 0], framed[:, :, :, -1]):
            edge.copy_(edge * (1 - frame) + red * frame)
        framed_rows = patchify(framed, u).reshape(b, -1, width)
        out_patches = patches.scatter(1, masked[..., None].expand(-1, -1, width), framed_rows)
        return unpatchify(out_patches, u, self.unit_grid)
