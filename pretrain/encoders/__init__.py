"""Encoder families behind one contract (:class:`~pretrain.encoders.base.Encoder`).

Importing the package registers every family in :data:`~pretrain.encoders.base.ENCODERS`:
``vit`` (:mod:`.vit`), ``swin`` (:mod:`.swin`), ``beit`` (:mod:`.beit`) and ``conv`` (:mod:`.conv`,
the Context Encoder's). A new family is one module here with a ``@register_encoder`` class and
its import below.
"""

from pretrain.encoders import beit, conv, swin, vit  # noqa: F401  (registers the families)
from pretrain.encoders.base import ENCODERS, Encoder, create_encoder, load_encoder

__all__ = ["ENCODERS", "Encoder", "create_encoder", "load_encoder"]
