"""The checkpoint formats, one module each; importing this package registers them all.

The import order is the order help texts and error messages list the formats in. A new format
is one module here (a :class:`~downstream.checkpoints.formats.base.CheckpointFormat` subclass
decorated with ``register_format``) plus its line below, and a synthesizer in the contract tests
(``tests/downstream/test_checkpoint_formats.py``).
"""

from downstream.checkpoints.formats import (  # noqa: F401, I001  (registers each, in this order)
    mimbench,
    mimbench_ckpt,
    timm,
    mae,
    beit,
    simmim,
    mmpretrain,
    swin,
    data2vec2,
    ijepa,
    ibot,
    cae,
    beit2,
    refused,
)
