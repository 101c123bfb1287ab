"""Checkpoint import and export: any ViT-family encoder in, timm state dicts and safetensors out.

Import reads a file weights-only (:mod:`.reading`), finds the state dict inside its container,
detects its format from the keys (or takes ``fmt``), converts the keys to those of one of our
encoder wrappers (ViT, BEiT, Swin) and loads them strictly (:mod:`.loading`), with the
architecture recorded in the file or read from the weights (:mod:`.architecture`). Each format
(our encoder files and pretraining checkpoints, timm, MAE, BEiT, SimMIM, mmpretrain, Swin) is one
class in :mod:`.formats` that says how it is detected, how its keys map and what it assumes;
they register in :data:`harness.core.config.CHECKPOINT_FORMATS`, the one list the config validates,
the CLI lists and the loader dispatches on.

Keys that belong to something other than the encoder (MAE's decoder, SimMIM's decoder, BEiT's
``lm_head``, classifier heads, mmpretrain's neck, buffers such as ``relative_position_index``)
are dropped and listed by reason in the :class:`ImportReport`. Exact conversions are applied and
reported: layer scale folded into the preceding linear layer (timm/mmpretrain ViTs), absent qkv
biases inserted as zeros, absolute position embeddings (bicubic) and relative position bias tables
resized when the target resolution differs from the checkpoint's.

Export (:mod:`.export`) writes an encoder as a plain timm state dict (``.pth``), as
``.safetensors`` and a JSON sidecar naming the timm architecture.
"""

from downstream.checkpoints import formats  # noqa: F401  (registers every checkpoint format)
from downstream.checkpoints.export import (
    EXPORT_FORMATS,
    export_encoder,
    export_paths,
    timm_architecture,
)
from downstream.checkpoints.files import guard_outputs
from downstream.checkpoints.formats.base import (
    CheckpointFormat,
    checkpoint_format,
    detect_family,
    register_format,
)
from downstream.checkpoints.loading import (
    build_encoder,
    import_checkpoint,
    import_state_dict,
    load_checkpoint,
)
from downstream.checkpoints.reading import (
    PRETRAIN_CHECKPOINT_META,
    load_file_weights_only,
    pretrain_checkpoint_meta,
    read_checkpoint,
    unwrap_state_dict,
)
from downstream.checkpoints.report import ImportReport
from downstream.checkpoints.timm_names import encoder_from_timm_name

__all__ = [
    "EXPORT_FORMATS",
    "PRETRAIN_CHECKPOINT_META",
    "CheckpointFormat",
    "ImportReport",
    "build_encoder",
    "checkpoint_format",
    "detect_family",
    "encoder_from_timm_name",
    "export_encoder",
    "export_paths",
    "guard_outputs",
    "import_checkpoint",
    "import_state_dict",
    "load_checkpoint",
    "load_file_weights_only",
    "pretrain_checkpoint_meta",
    "read_checkpoint",
    "register_format",
    "timm_architecture",
    "unwrap_state_dict",
]
