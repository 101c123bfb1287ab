"""Pretraining: encoders, the parts of a recipe (masking, heads, targets, tokenizers, losses),
one module per recipe, the engine.

Importing the package registers every recipe file (:mod:`pretrain.recipes`) and every part in
the registries that config validation reads (:mod:`harness.core.config.axes`), as importing
:mod:`downstream` registers the tasks. A new part is a module listed here.
"""

from pretrain import (  # noqa: F401  (each registers its parts)
    beit,
    capi,
    color_clusters,
    context_encoder,
    context_prediction,
    dall_e,
    data2vec2,
    heads,
    ibot,
    ijepa,
    losses,
    mae,
    maskfeat,
    masking,
    model,
    recipes,
    selfie,
    simmim,
    targets,
    teacher,
    tokenizers,
    vit_mpp,
)
