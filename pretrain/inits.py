"""Encoder initialisation rules (``recipe.encoder_init``), each the rule of a paper's reference code.

A rule runs once on the freshly built encoder (:class:`pretrain.model.MIMModel`), before the head
and the target are built; it touches the encoder only (MAE's decoder keeps its own init,
:mod:`pretrain.mae`). The parts a rule names come from the encoder contract
(:meth:`pretrain.encoders.base.Encoder.init_parts`); every other weight is reached through the
trunk's ``nn.Linear`` / ``nn.LayerNorm`` modules.

============  =====================================================================================
``timm``      timm's own initialisation of each family (``default`` is the same rule under its old
              name, kept so configs hashed with it keep their hashes): ViT linear layers
              trunc-normal(0.02), the patch embedding PyTorch's default conv init, the class token
              normal(1e-6); Swin and BEiT as timm builds them.
``mae``       MAE, ``models_mae.py`` ``MaskedAutoencoderViT.initialize_weights`` / ``_init_weights``
              (He et al., CVPR 2022): every linear layer xavier-uniform with zero bias, LayerNorms
              weight 1 and bias 0, the patch embedding's weight xavier-uniform viewed as a
              ``[D, C*p*p]`` matrix, the class and mask tokens normal(0.02).
``beit``      BEiT, ``modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling.__init__``,
              ``_init_weights`` and ``fix_init_weight`` (Bao et al., ICLR 2022): linear and patch
              embedding weights truncated-normal with std 0.02 *cut at +-0.02* (the file's own
              ``trunc_normal_`` passes ``a=-std, b=std``, so the drawn std is 0.02 x 0.5399),
              biases 0, LayerNorms 1 / 0, class / mask tokens and a learned position embedding the
              same truncated normal; then block ``l`` (1-based) has its attention output projection
              and MLP second layer divided by ``sqrt(2 l)``.
``simmim``    SimMIM (Xie et al., CVPR 2022). ViT: ``models/vision_transformer.py``
              ``VisionTransformer.__init__`` / ``_init_weights`` / ``fix_init_weight`` and
              ``models/simmim.py`` ``VisionTransformerForSimMIM`` (mask token): BEiT's rule with
              timm's ``trunc_normal_`` (cut at +-2, i.e. plain normal(0.02) at this std).
              Swin: ``models/swin_transformer.py`` ``SwinTransformer._init_weights`` and
              ``SwinTransformerForSimMIM`` (mask token): linear layers truncated-normal(0.02) with
              zero bias, LayerNorms 1 / 0, the mask token truncated-normal(0.02), no rescaling, the
              patch embedding left at PyTorch's default.
``data2vec``  data2vec (Baevski et al., ICML 2022), fairseq ``examples/data2vec/models/
              data2vec_vision.py`` ``TransformerEncoder.init_weights`` / ``fix_init_weight`` and
              ``Data2VecVisionModel.__init__``: SimMIM's ViT rule (torch's ``trunc_normal_``, cut
              at +-2) on the transformer and the class / mask tokens, but the patch embedding (built
              outside the transformer) keeps PyTorch's default conv init.
``ijepa``     I-JEPA (Assran et al., CVPR 2023) as its training runs: ``src/models/
              vision_transformer.py`` ``VisionTransformer.__init__`` inits linear layers and the
              patch-embedding conv truncated-normal(0.02) cut at +-2 (``src/utils/tensors.py``
              ``trunc_normal_``, a=-2, b=2) with zero biases and rescales block ``l``'s output
              layers by ``1 / sqrt(2 l)`` (``fix_init_weight``), but ``src/helper.py``
              ``init_model`` then re-initialises every ``nn.Linear`` of the built encoder
              truncated-normal(0.02) with zero bias, which undoes that rescale: linears and
              the patch embedding truncated-normal(0.02), no rescale (the reference has no class
              or mask token in its encoder; ours get the same truncated normal; the fixed
              sin-cos positions are not initialised).
============  =====================================================================================

The rules for MAE, BEiT, data2vec and I-JEPA are written for ViTs (a class token, one width);
naming them for a Swin or conv encoder is refused at validation
(:class:`EncoderInitRule.check_family`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harness.core.config import EncoderConfig, RecipeConfig
from harness.core.config.axes import ENCODER_INITS, EncoderInitRule
from harness.core.config.encoder import VARIANT_FIELDS
from pretrain.encoders.base import Encoder, InitParts

#: Families with a class token and one width (the ViT rules' domain).
VIT_FAMILIES = ("vit", "beit")


def _register(name: str, families: tuple[str, ...] | None, source: str) -> Callable:
    def deco(fn: Callable[[Encoder], None]) -> Callable[[Encoder], None]:
        ENCODER_INITS.register(name, EncoderInitRule(fn, families, source))
        return fn

    return deco


def linear_norm_init(weight_init: Callable[[torch.Tensor], None]) -> Callable[[nn.Module], None]:
    """The per-module ``_init_weights`` that MAE, BEiT and SimMIM ``apply`` to a whole model:
    an ``nn.Linear`` gets ``weight_init`` on its weight and a zero bias, a LayerNorm weight 1 and
    bias 0 (use with ``module.apply``, the references' visiting order)."""

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            weight_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    return init


def rescale_residual_out(parts: InitParts) -> None:
    """BEiT's ``fix_init_weight``: block ``l`` (1-based) divides its attention output projection
    and MLP second-layer weights by ``sqrt(2 l)``."""
    for layer_id, (proj, fc2) in enumerate(parts.residual_out, start=1):
        proj.weight.div_(math.sqrt(2.0 * layer_id))
        fc2.weight.div_(math.sqrt(2.0 * layer_id))


@_register("default", None, "the family's own initialisation (timm's); the old name of 'timm'")
@_register("timm", None, "the family's own initialisation (timm's)")
def timm_init(encoder: Encoder) -> None:
    """Keep the initialisation the family's timm model gave the encoder."""


@_register("mae", VIT_FAMILIES, "MAE models_mae.py initialize_weights")
@torch.no_grad()
def mae_init(encoder: Encoder) -> None:
    """MAE's ``initialize_weights`` on the encoder (see the module docstring)."""
    parts = encoder.init_parts()
    encoder.trunk.apply(linear_norm_init(nn.init.xavier_uniform_))
    w = parts.patch_embed.weight  # [D, C, p, p], initialised as the [D, C*p*p] matrix
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if parts.class_token is not None:
        nn.init.normal_(parts.class_token, std=0.02)
    nn.init.normal_(parts.mask_token, std=0.02)


def _beit_style(
    encoder: Encoder, std_cut: float | None, patch_embed: bool = True, rescale: bool = True
) -> None:
    """BEiT's and SimMIM-ViT's rule: truncated normal(0.02) cut at ``+-std_cut`` (None: timm's
    default cut at +-2) on linear, patch embedding (unless ``patch_embed`` is False: left as
    built), tokens and a learned position embedding, then (unless ``rescale`` is False)
    :func:`rescale_residual_out`."""
    bounds = {"a": -std_cut, "b": std_cut} if std_cut is not None else {}

    def tn(t: torch.Tensor) -> None:
        nn.init.trunc_normal_(t, std=0.02, **bounds)

    parts = encoder.init_parts()
    encoder.trunk.apply(linear_norm_init(tn))
    if patch_embed:
        tn(parts.patch_embed.weight)
        if parts.patch_embed.bias is not None:
            nn.init.zeros_(parts.patch_embed.bias)
    for p in (parts.class_token, parts.mask_token, parts.learned_pos_embed):
        if p is not None:
            tn(p)
    if rescale:
        rescale_residual_out(parts)


@_register("beit", VIT_FAMILIES, "BEiT modeling_pretrain.py _init_weights + fix_init_weight")
@torch.no_grad()
def beit_init(encoder: Encoder) -> None:
    """BEiT's pretraining init (see the module docstring): the cut at +-std is BEiT's own."""
    _beit_style(encoder, std_cut=0.02)


@_register(
    "simmim",
    (*VIT_FAMILIES, "swin", "swinv2"),
    "SimMIM models/vision_transformer.py (ViT) and models/swin_transformer.py (Swin) "
    "_init_weights; SwinV2: the Swin repo's models/swin_transformer_v2.py _init_weights + "
    "_init_respostnorm",
)
@torch.no_grad()
def simmim_init(encoder: Encoder) -> None:
    """SimMIM's init: BEiT's rule with timm's truncation for ViTs, Swin's own for Swin (and
    SwinV2, whose residual post-norms then start at zero)."""
    if encoder.isotropic:
        _beit_style(encoder, std_cut=None)
        return
    parts = encoder.init_parts()
    encoder.trunk.apply(linear_norm_init(lambda t: nn.init.trunc_normal_(t, std=0.02)))
    nn.init.trunc_normal_(parts.mask_token, std=0.02)
    for norm in parts.post_norms:
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)


@_register(
    "data2vec",
    VIT_FAMILIES,
    "data2vec data2vec_vision.py TransformerEncoder.init_weights + fix_init_weight",
)
@torch.no_grad()
def data2vec_init(encoder: Encoder) -> None:
    """data2vec's vision init: SimMIM's ViT rule, the patch embedding left at its default."""
    _beit_style(encoder, std_cut=None, patch_embed=False)


@_register(
    "ijepa",
    VIT_FAMILIES,
    "I-JEPA vision_transformer.py _init_weights, then helper.py init_model's re-init of every "
    "linear (which undoes fix_init_weight's rescale)",
)
@torch.no_grad()
def ijepa_init(encoder: Encoder) -> None:
    """I-JEPA's init as ``src/train.py`` builds the encoder: truncated normal(0.02) cut at +-2
    on linear layers, the patch embedding and the tokens, no residual rescale."""
    _beit_style(encoder, std_cut=None, rescale=False)


def encoder_definition(encoder: EncoderConfig, recipe: RecipeConfig) -> dict[str, Any]:
    """What a run's summary records about its encoder: the setup (``paper`` / ``controlled``),
    the initialisation and the reference it follows, the family and the variant fields."""
    name = "timm" if recipe.encoder_init == "default" else recipe.encoder_init
    return {
        "setup": recipe.encoder_setup,
        "init": name,
        "init_source": ENCODER_INITS.get(recipe.encoder_init).source,
        "family": encoder.family,
        **{k: getattr(encoder, k) for k in VARIANT_FIELDS},
    }
