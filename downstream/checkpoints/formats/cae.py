"""``cae``: the Context Autoencoder's release (Chen et al., IJCV 2023,
github.com/Atten4Vis/CAE ``models/modeling_cae.py``)."""

from __future__ import annotations

from typing import Any

import torch

from downstream.checkpoints.formats.base import CheckpointFormat, Converted, register_format
from downstream.checkpoints.keys import convert_beit_like, split_layout
from downstream.checkpoints.report import ImportReport

#: ``ContextAutoencoderViT``'s parts besides its encoder.
_NOT_ENCODER = {
    "alignment_encoder.": "CAE alignment encoder (a copy of the encoder)",
    "regresser.": "CAE latent contextual regressor",
    "decoder.": "CAE decoder",
    "encoder_to_regresser": "CAE encoder-to-regressor projection",
    "mask_token": "CAE regressor's mask token",
    "rd_pos_embed": "CAE regressor / decoder position embedding",
}


@register_format
class CaeFormat(CheckpointFormat):
    """The encoder under ``encoder.`` (a BEiT-style ViT: q / v biases, layer scale
    ``gamma_1`` / ``gamma_2`` when trained with it, the sin-cos absolute position embedding with
    its class position as stored, no relative position bias) onto the BEiT wrapper. The
    position embedding has a class entry: ``models/modeling_cae_helper.py``
    ``VisionTransformerEncoder`` builds it with ``build_2d_sincos_position_embedding(...,
    use_cls_token=True)``, a zero ``[1, 1, D]`` row before the patches' sin-cos rows, kept as a
    non-trainable parameter (so stored, ``[1, 1 + N, D]``). The
    alignment encoder, regressor, decoder and their mask token / positions are dropped; any other
    key is refused. Detected before ``simmim`` (which also has ``encoder.``) by the regressor.
    """

    name = "cae"
    detect_rank = 25

    def detect(
        self, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, container: str | None
    ) -> bool:
        return any(k.startswith("encoder.") for k in state) and any(
            k.startswith(("regresser.", "alignment_encoder.")) for k in state
        )

    def convert(
        self, state: dict[str, torch.Tensor], report: ImportReport, meta: dict[str, Any] | None
    ) -> Converted:
        inner = split_layout(state, "encoder.", _NOT_ENCODER, report, "CAE")
        return "beit", convert_beit_like(inner, report)
