"""``timm:<model name>``: a randomly initialized encoder with a timm architecture."""

from __future__ import annotations

import timm
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer

from downstream.checkpoints.architecture import nearest_vit_preset
from downstream.checkpoints.loading import import_state_dict
from downstream.checkpoints.report import ImportReport
from harness.core.config import EncoderConfig
from harness.core.errors import CheckpointError
from harness.core.registry import did_you_mean
from pretrain.encoders import Encoder


def encoder_from_timm_name(name: str) -> tuple[Encoder, ImportReport]:
    """A randomly initialized encoder with the architecture of timm model ``name``.

    Nothing is downloaded: timm builds the model with ``pretrained=False`` (seed torch first for
    a reproducible init) and its state dict is imported like a checkpoint, so ViT variants with
    layer scale or without qkv bias map exactly onto our wrapper and BEiTs onto the BEiT one.
    """
    if not timm.is_model(name):
        raise CheckpointError(
            f"'{name}' is neither a file nor a timm model name;{did_you_mean(name, timm.list_models())} "
            "give a checkpoint path, random:<preset>, or a timm model name"
        )
    is_beit = timm.models.model_entrypoint(name).__module__.endswith(".beit")
    # BEiT: keep the final norm on the tokens (its 'avg' pooling would move it after pooling)
    model = timm.create_model(
        name, pretrained=False, num_classes=0, **({"global_pool": "token"} if is_beit else {})
    )
    report = ImportReport(source=f"timm:{name}", family="timm", detected="timm", container=None)
    state = {k: v for k, v in model.state_dict().items()}
    cfg: EncoderConfig | None = None
    if isinstance(model, Beit):
        report.family = "beit"
        cfg = _vit_config(model)
    elif isinstance(model, VisionTransformer):
        _check_class_token(model, name)
        cfg = _vit_config(model)
    elif isinstance(model, SwinTransformer | SwinTransformerV2):
        report.family = "swin"  # the architecture is the Swin / SwinV2 preset of its shape
    else:
        raise CheckpointError(
            f"timm model '{name}' is a {type(model).__name__}; the encoder wrappers cover timm's "
            "VisionTransformer, Beit and (preset shapes of) SwinTransformer / SwinTransformerV2"
        )
    enc = import_state_dict(state, report, cfg)
    return enc, report


def _vit_config(model: VisionTransformer | Beit) -> EncoderConfig:
    """The encoder config of a timm ViT or BEiT (its width, depth, heads, patch and size)."""
    patch = model.patch_embed.patch_size[0]
    return EncoderConfig(
        arch=nearest_vit_preset(model.embed_dim, len(model.blocks), patch),
        img_size=model.patch_embed.img_size[0],
        patch_size=patch,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim,
        pos_embed="learned",
    )


def _check_class_token(model: VisionTransformer, name: str) -> None:
    """Refuse a timm ViT without exactly one class token that has its own position."""
    if (
        model.num_prefix_tokens != 1
        or model.cls_token is None
        or getattr(model, "no_embed_class", False)
    ):
        raise CheckpointError(
            f"timm model '{name}' has {model.num_prefix_tokens} prefix tokens / no class token "
            "with position: the ViT wrapper needs exactly one class token with its own position"
        )
