"""Encoder families behind one contract (:class:`~pretrain.encoders.base.Encoder`).

Importing the package registers every family in :data:`~pretrain.encoders.base.ENCODERS`:
``vit`` (:mod:`.vit`), ``swin`` (:mod:`.swin`), ``swinv2`` (:mod:`.swinv2`), ``beit``
(:mod:`.beit`), ``conv`` (:mod:`.conv`, the Context Encoder's), ``igpt`` (:mod:`.igpt`, pixel
tokens), ``vit_postnorm`` and ``vit_avgpool`` (:mod:`.released`, layouts of published
checkpoints). A new family is one module here with a ``@register_encoder`` class and its import
below.
"""

from pretrain.encoders import (  # noqa: F401  (registers them)
    beit,
    conv,
    igpt,
    released,
    swin,
    swinv2,
    vit,
)
from pretrain.encoders.base import ENCODERS, Encoder, create_encoder, load_encoder

__all__ = ["ENCODERS", "Encoder", "create_encoder", "load_encoder"]
