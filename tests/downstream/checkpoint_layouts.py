"""Checkpoint layouts synthesized from tiny encoders with known random weights: each builder
writes what a release of that family holds (its key names, containers, extra heads and
buffers), so that importing it can be compared with the encoder it came from. Shared by
``test_checkpoints.py`` and the per-format contract tests (``test_checkpoint_formats.py``)."""

from __future__ import annotations

import argparse
import re

import torch

from downstream.swin_keys import timm_to_mm_swin
from harness.core.config import EncoderConfig
from pretrain.encoders.beit import BeitEncoder
from pretrain.encoders.swin import SwinEncoder
from pretrain.encoders.vit import ViTEncoder

MICRO = EncoderConfig(arch="vit_micro_32", pos_embed="learned")


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Known, non-trivial weights everywhere (gammas, rel tables and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def random_vit(seed: int = 0) -> ViTEncoder:
    """A micro ViT (width 32, 2 blocks, 32 px) with known random weights."""
    torch.manual_seed(seed)
    return randomize(ViTEncoder(MICRO), seed)


def random_beit(shared: bool, abs_pos: bool = False, seed: int = 1) -> BeitEncoder:
    """A micro BEiT (per-block or ``shared`` relative position bias) with known weights."""
    opts = {
        "use_abs_pos_emb": abs_pos,
        "use_rel_pos_bias": not shared,
        "use_shared_rel_pos_bias": shared,
        "layer_scale": True,
        "qkv_bias": True,
    }
    return randomize(BeitEncoder(MICRO, opts), seed)


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    """A fixed batch of random images, ``[n, 3, size, size]``."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def feature_diff(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> float:
    """The largest absolute difference of two encoders' ``forward_features`` on :func:`images`."""
    x = images(size=size)
    with torch.no_grad():
        return float((a.eval().forward_features(x) - b.eval().forward_features(x)).abs().max())


def save(obj, path):
    """``torch.save(obj, path)``, returning ``path``."""
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------- layout builders


def mae_layout(enc: ViTEncoder) -> dict:
    """MAE's release: timm keys under 'model', its decoder, and the pickled args."""
    sd = dict(enc.timm_state_dict())
    sd["mask_token"] = torch.randn(1, 1, 24)  # the decoder's (width 24 here)
    sd["decoder_embed.weight"] = torch.randn(24, 32)
    sd["decoder_pos_embed"] = torch.randn(1, 17, 24)
    sd["decoder_blocks.0.norm1.weight"] = torch.randn(24)
    sd["decoder_pred.weight"] = torch.randn(192, 24)
    return {
        "model": sd,
        "args": argparse.Namespace(model="mae_vit_micro", mask_ratio=0.75),
        "epoch": 799,
    }


def beit_layout(enc: BeitEncoder) -> dict:
    """BEiT's release: timm-Beit keys plus index buffers, lm_head and the encoder mask token."""
    sd = dict(enc.timm_state_dict())
    for k in list(sd):
        if k.endswith("relative_position_bias_table"):
            sd[k.replace("bias_table", "index")] = torch.zeros(17, 17, dtype=torch.long)
    sd["mask_token"] = enc.mask_token.detach().clone()
    sd["lm_head.weight"] = torch.randn(8192, 32)
    return {"model": sd}


def simmim_vit_layout(enc: BeitEncoder) -> dict:
    """SimMIM's ViT: BEiT-style encoder under 'encoder.', a 1x1-conv decoder under 'decoder.'."""
    inner = beit_layout(enc)["model"]
    inner.pop("lm_head.weight")
    sd = {f"encoder.{k}": v for k, v in inner.items()}
    sd["decoder.0.weight"] = torch.randn(8 * 8 * 3, 32, 1, 1)
    sd["decoder.0.bias"] = torch.randn(8 * 8 * 3)
    return {"model": sd, "epoch": 99}


def swin_original_layout(enc: SwinEncoder) -> dict[str, torch.Tensor]:
    """The Swin repo's layout: downsampling at the end of a stage, index / mask buffers."""
    sd = {}
    for k, v in enc.timm_state_dict().items():
        k = re.sub(
            r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k
        )
        sd[k] = v
        if k.endswith("relative_position_bias_table"):
            sd[k.replace("bias_table", "index")] = torch.zeros(4, 4, dtype=torch.long)
    return sd


def mmpretrain_layout(state: dict[str, torch.Tensor]) -> dict:
    """mmpretrain: 'backbone.' prefix, ln1/ln2, ffn.layers, patch_embed.projection, its neck/head."""
    rules = [
        (r"^patch_embed\.proj\.", "patch_embed.projection."),
        (r"^blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
        (r"^blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
        (r"^blocks\.(\d+)\.ls1\.gamma$", r"layers.\1.attn.gamma1.weight"),
        (r"^blocks\.(\d+)\.ls2\.gamma$", r"layers.\1.ffn.gamma2.weight"),
        (r"^blocks\.(\d+)\.", r"layers.\1."),
        (r"^norm\.", "ln1."),
    ]
    sd = {}
    for k, v in state.items():
        for pat, rep in rules:
            nk = re.sub(pat, rep, k)
            if nk != k:
                k = nk
                break
        sd[f"backbone.{k}"] = v
    sd["neck.decoder_embed.weight"] = torch.randn(16, 32)
    sd["head.fc.weight"] = torch.randn(10, 32)
    return {"meta": {"mmpretrain_version": "1.2.0", "epoch": 1}, "state_dict": sd}


# 3 stages, window 2 below every stage's grid at 64 px (16, 8, 4): neither timm nor OpenMMLab
# shrinks, pads or unshifts a window, so mmdet's Swin computes what timm's does
SWIN_64 = dict(timm_name="swin_tiny_patch4_window7_224", family="swin", img_size=64,
               patch_size=4, embed_dim=16, depth=6, num_heads=1, mlp_ratio=2.0,
               stage_depths=(2, 2, 2), stage_heads=(1, 2, 4), window_size=2)  # fmt: skip


def mmpretrain_swin_layout(enc: SwinEncoder) -> dict:
    """mmpretrain's Swin (mmdet's / mmseg's key layout): the dense tasks' timm -> OpenMMLab
    mapping under 'backbone.', persistent index buffers, the last stage's output norm, a head."""
    n = enc.num_stages
    mm = timm_to_mm_swin(enc.timm_state_dict(), n, int(enc.cfg.timm_kwargs()["window_size"]))
    sd = {}
    for k, v in mm.items():
        sd[f"backbone.{k}"] = v
        if k.endswith("relative_position_bias_table"):
            w = (round(v.shape[0] ** 0.5) + 1) // 2
            sd[f"backbone.{k.replace('bias_table', 'index')}"] = torch.zeros(
                w * w, w * w, dtype=torch.long
            )
    assert f"backbone.norm{n - 1}.weight" in sd
    sd["head.fc.weight"] = torch.randn(10, enc.num_features)
    sd["head.fc.bias"] = torch.randn(10)
    return {"meta": {"mmpretrain_version": "1.2.0", "epoch": 1}, "state_dict": sd}


def random_swin(cfg: EncoderConfig, seed: int = 6) -> SwinEncoder:
    """A Swin of preset ``cfg`` with known random weights."""
    torch.manual_seed(seed)
    return randomize(SwinEncoder(cfg), seed)


def pretraining_checkpoint(seed: int = 7) -> tuple[torch.nn.Module, dict]:
    """``(encoder, checkpoint)``: our pretraining ``checkpoint.pth`` of a micro SimMIM model (the
    whole MIM model's state dict, no recorded encoder config)."""
    from harness.core.config import RecipeConfig
    from pretrain.model import MIMModel

    torch.manual_seed(0)
    model = MIMModel(MICRO, RecipeConfig(name="simmim", masking={"mask_patch_size": 16}))
    randomize(model.encoder, seed)
    return model.encoder, {"model": model.state_dict(), "step": 3}


# --------------------------------------------------------------------------- latent-target releases


def random_released(family: str, seed: int, **options: bool) -> torch.nn.Module:
    """A micro encoder of a released layout's family (``vit_postnorm``, ``vit_avgpool``) with
    known random weights (``options``: its norms)."""
    from pretrain.encoders import create_encoder

    torch.manual_seed(seed)
    return randomize(create_encoder(MICRO, family, options or None), seed)


def _renamed(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``sd`` with each key renamed by the first matching ``(pattern, replacement)``."""
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def data2vec2_layout(enc: torch.nn.Module, n_pre: int = 1) -> dict:
    """fairseq's data2vec 2.0 image checkpoint: the image modality encoder (patch embedding,
    fixed positions, one extra token, the context encoder's norm and its first ``n_pre``
    blocks), the main blocks renumbered from 0, the decoder, the EMA teacher (a dict, not a
    tensor) and fairseq's plain-dict ``cfg``."""
    img = "modality_encoders.IMAGE."
    sd = _renamed(enc.timm_state_dict(), [
        (r"^patch_embed\.proj\.", f"{img}local_encoder.proj."),
        (r"^pos_embed$", f"{img}fixed_positional_encoder.positions"),
        (r"^cls_token$", f"{img}extra_tokens"),
        (r"^norm_pre\.", f"{img}context_encoder.norm."),
    ])  # fmt: skip
    out = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.+)$", k)
        if m and int(m.group(1)) < n_pre:
            k = f"{img}context_encoder.blocks.{m.group(1)}.{m.group(2)}"
        elif m:
            k = f"blocks.{int(m.group(1)) - n_pre}.{m.group(2)}"
        out[k] = v
    out[f"{img}decoder.blocks.0.0.weight"] = torch.randn(16, 2, 3, 3)
    out[f"{img}decoder.proj.weight"] = torch.randn(32, 16)
    out["_ema"] = {"blocks.0.norm1.weight": torch.randn(32)}
    return {"model": out, "cfg": {"model": {"_name": "data2vec_multi", "depth": 2}},
            "optimizer_history": [{"num_updates": 10}]}  # fmt: skip


def ijepa_layout(enc: torch.nn.Module) -> dict:
    """I-JEPA's checkpoint (``src/train.py`` ``save_checkpoint``): DDP-prefixed student
    ``encoder``, ``predictor`` and the EMA ``target_encoder`` (the weights of ``enc``), the
    optimizer and (bfloat16 runs) grad-scaler state, epoch, loss, batch size, world size, lr."""
    sd = enc.timm_state_dict()
    student = {f"module.{k}": torch.randn_like(v) for k, v in sd.items()}
    predictor = {"module.predictor_embed.weight": torch.randn(16, 32),
                 "module.mask_token": torch.randn(1, 1, 16)}  # fmt: skip
    return {"encoder": student, "predictor": predictor,
            "target_encoder": {f"module.{k}": v for k, v in sd.items()},
            "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "epoch": 3, "loss": 0.5, "batch_size": 8, "world_size": 1, "lr": 1e-3}  # fmt: skip


def ibot_layout(enc: ViTEncoder, teacher_mask_token: bool = False) -> dict:
    """iBOT's checkpoint (``main_ibot.py`` ``save_dict``): the DDP student and the teacher, each
    a ``MultiCropWrapper`` (the ViT under ``backbone.``, the iBOT head under ``head.``), the
    optimizer, the epoch, the pickled ``args`` and the loss's centers (``ibot_loss``). Only the
    student is built with ``masked_im_modeling=True``, so only it holds the mask token
    ``masked_embed`` ``[1, D]`` (the teacher loads the student's weights with ``strict=False``);
    ``teacher_mask_token`` adds one to the teacher, for the converter's mapping of it."""

    def model(sd: dict[str, torch.Tensor], token: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out = {f"backbone.{k}": v for k, v in sd.items()}
        if token is not None:
            out["backbone.masked_embed"] = token.reshape(1, -1)
        out["head.mlp.0.weight"] = torch.randn(64, 32)
        out["head.last_layer.weight_g"] = torch.ones(100, 1)
        out["head.last_layer2.weight_v"] = torch.randn(100, 16)
        return out

    token = enc.mask_token.detach()
    student = {f"module.{k}": torch.randn_like(v)
               for k, v in model(enc.timm_state_dict(), token).items()}  # fmt: skip
    teacher = model(enc.timm_state_dict(), token if teacher_mask_token else None)
    return {"student": student, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
            "epoch": 5, "args": argparse.Namespace(arch="vit_micro"),
            "ibot_loss": {"center": torch.zeros(1, 100), "center2": torch.zeros(1, 1, 100)}}  # fmt: skip


def cae_layout(enc: BeitEncoder) -> dict:
    """CAE's checkpoint: the BEiT-style encoder under ``encoder.`` beside the alignment encoder,
    the regressor, the decoder, their mask token and sin-cos positions."""
    sd = {f"encoder.{k}": v for k, v in enc.timm_state_dict().items()}
    sd.update({f"alignment_encoder.{k}": torch.randn_like(v)
               for k, v in enc.timm_state_dict().items()})  # fmt: skip
    sd["regresser.cross_attn_blocks.0.norm1_q.weight"] = torch.randn(32)
    sd["decoder.blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["mask_token"] = torch.randn(1, 1, 32)
    sd["rd_pos_embed"] = torch.randn(1, 17, 32)
    return {"model": sd, "epoch": 10}


def beit2_layout(enc: BeitEncoder) -> dict:
    """BEiT v2's pretraining checkpoint: BEiT's release plus the patch-aggregation head."""
    sd = beit_layout(enc)["model"]
    for k, v in list(sd.items()):
        if k.startswith("blocks.0."):
            sd[k.replace("blocks.0.", "cls_pt_layers.0.")] = torch.randn_like(v.float())
    sd["cls_pt_norm.weight"] = torch.randn(32)
    sd["cls_pt_lm_head.weight"] = torch.randn(8192, 32)
    return {"model": sd}


def capi_layout() -> dict[str, torch.Tensor]:
    """CAPI's ``EncoderDecoder`` keys (RoPE, RMSNorm, separate q / k / v, registers)."""
    blk = "encoder.blocks.0."
    return {"registers": torch.randn(1, 16, 32), "patch_embed.weight": torch.randn(32, 3, 8, 8),
            f"{blk}residual1.norm.weight": torch.randn(32),
            f"{blk}residual1.fn.q_proj.weight": torch.randn(32, 32),
            f"{blk}residual1.fn.rope.freqs": torch.randn(2, 16),
            f"{blk}residual2.fn.fc1.weight": torch.randn(128, 32),
            "enc_norm.weight": torch.randn(32), "mask_token": torch.randn(1, 32)}  # fmt: skip


def aim_layout() -> dict[str, torch.Tensor]:
    """AIM v1's backbone keys (``preprocessor`` with the patch norm, ``trunk``)."""
    return {"preprocessor.patchifier.proj.weight": torch.randn(32, 3, 8, 8),
            "preprocessor.patchifier.norm.weight": torch.randn(32),
            "trunk.blocks.0.attn.qkv.weight": torch.randn(96, 32),
            "trunk.blocks.0.norm_1.weight": torch.randn(32),
            "trunk.post_trunk_norm.weight": torch.randn(32)}  # fmt: skip
