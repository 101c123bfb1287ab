"""An encoder wrapper for BEiT-style ViTs, so that BEiT and SimMIM-ViT checkpoints can be evaluated.

BEiT (Bao et al., ICLR 2022) and SimMIM's ViT (Xie et al., CVPR 2022, built on BEiT's code)
differ from the plain ViT of :class:`pretrain.encoder.ViTEncoder` in three ways that cannot be
expressed in timm's ``VisionTransformer``:

* relative position bias, per block or shared by all blocks (an additive attention bias that
  depends on the relative offset of two patches), usually with no absolute position embedding;
* layer scale (``gamma_1``, ``gamma_2``): a learned per-channel scale on each residual branch;
* a query and a value bias but no key bias.

Layer scale and the q/v biases could be folded into a plain ViT exactly; the relative position
bias cannot. So imported BEiT-style checkpoints get this wrapper over timm's
:class:`~timm.models.beit.Beit` (whose key names are BEiT's), with the same contract as
``ViTEncoder``: ``forward_features(x, mask)`` with a mask token, ``pool``, ``layer_id`` for
layer-wise lr decay, ``forward_intermediates``, ``block_outputs`` and timm-keyed checkpoints
(``timm.create_model('beit_base_patch16_224', checkpoint_path=..., **timm_kwargs)`` loads one).

Pretraining in mimbench uses the plain ViT; this wrapper exists for evaluation of imported weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from harness.core.config import EncoderConfig
from harness.core.errors import CheckpointError
from pretrain.encoder import ViTEncoder

#: timm architecture the wrapper instantiates (every shape value is passed explicitly).
BEIT_TIMM_NAME = "beit_base_patch16_224"
#: The BEiT-specific switches an encoder file stores next to the EncoderConfig.
#: Defaults are BEiT-B's (per-block relative position bias, layer scale, q/v biases).
BEIT_DEFAULT_OPTIONS: dict[str, bool] = {
    "use_abs_pos_emb": False,
    "use_rel_pos_bias": True,
    "use_shared_rel_pos_bias": False,
    "layer_scale": True,
    "qkv_bias": True,
}
BEIT_OPTION_KEYS = tuple(BEIT_DEFAULT_OPTIONS)


def beit_timm_kwargs(cfg: EncoderConfig, options: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``timm.create_model(BEIT_TIMM_NAME, **kwargs)`` for ``cfg`` + options."""
    o = {**BEIT_DEFAULT_OPTIONS, **options}
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "num_classes": 0,
        "global_pool": "token",  # keeps the final norm on the tokens (BEiT pretraining)
        "use_abs_pos_emb": bool(o["use_abs_pos_emb"]),
        "use_rel_pos_bias": bool(o["use_rel_pos_bias"]),
        "use_shared_rel_pos_bias": bool(o["use_shared_rel_pos_bias"]),
        "init_values": 0.1 if o["layer_scale"] else None,
        "qkv_bias": bool(o["qkv_bias"]),
    }


class BeitEncoder(nn.Module):
    """timm's BEiT with a mask token, behind the ``ViTEncoder`` contract.

    Args:
        cfg: Shape of the encoder (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``,
            ``img_size``, ``mlp_ratio``, ``drop_path_rate``); ``arch`` is the nearest preset.
        options: BEiT switches, keys of :data:`BEIT_OPTION_KEYS`.
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: EncoderConfig, options: dict[str, Any] | None = None) -> None:
        options = options or {}
        super().__init__()
        unknown = set(options) - set(BEIT_OPTION_KEYS)
        if unknown:
            raise ValueError(f"unknown BEiT option(s) {sorted(unknown)}; known: {BEIT_OPTION_KEYS}")
        self.cfg = cfg
        self.options = {k: bool(options.get(k, v)) for k, v in BEIT_DEFAULT_OPTIONS.items()}
        self.beit = timm.create_model(
            BEIT_TIMM_NAME,
            pretrained=False,
            drop_path_rate=cfg.drop_path_rate,
            **beit_timm_kwargs(cfg, self.options),
        )
        self.patch_size: int = int(cfg.patch_size)  # type: ignore[arg-type]
        self.embed_dim: int = int(cfg.embed_dim)  # type: ignore[arg-type]
        self.grid_size: tuple[int, int] = tuple(self.beit.patch_embed.grid_size)  # type: ignore[assignment]
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.beit.blocks)

    @property
    def encoder_stride(self) -> int:
        """Pixels per output token."""
        return self.patch_size

    @property
    def num_features(self) -> int:
        """Width of the output tokens."""
        return self.embed_dim

    @property
    def feature_grid(self) -> tuple[int, int]:
        """Grid of the output tokens after the class token."""
        return self.grid_size

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """``timm.create_model(BEIT_TIMM_NAME, **timm_kwargs)`` builds this architecture."""
        return beit_timm_kwargs(self.cfg, self.options)

    def no_weight_decay(self) -> set[str]:
        """Position embedding, class and mask tokens, relative position bias tables."""
        names = {
            f"beit.{n}"
            for n, _ in self.beit.named_parameters()
            if "relative_position_bias_table" in n
        }
        return names | {"beit.pos_embed", "beit.cls_token", "mask_token"}

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay group: 0 = embeddings (and the shared relative position bias),
        i+1 = block i, L+1 = top (as BEiT's ``get_num_layer_for_vit``)."""
        name = name.removeprefix("encoder.")
        if name.startswith(
            (
                "beit.cls_token",
                "beit.pos_embed",
                "beit.patch_embed",
                "beit.rel_pos_bias",
                "mask_token",
            )
        ):
            return 0
        if name.startswith("beit.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    patchify = ViTEncoder.patchify
    unpatchify = ViTEncoder.unpatchify

    def _check_input(self, x: torch.Tensor) -> None:
        exp = tuple(self.beit.patch_embed.img_size)
        if tuple(x.shape[-2:]) != exp:
            raise ValueError(
                f"encoder expects {exp[0]}x{exp[1]} images, got {x.shape[-2]}x{x.shape[-1]}: "
                "set the data transform to the encoder's img_size (or encoder.img_size)"
            )

    # ------------------------------------------------------------------ forwards
    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings only, ``[B, C, H, W] -> [B, L, D]``."""
        self._check_input(x)
        return self.beit.patch_embed(x)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token, class token, absolute position (if any): ``[B, 1 + L, D]``."""
        t = self.patch_tokens(x)  # [B, L, D]
        if mask is not None:
            w = mask.unsqueeze(-1).to(t.dtype)  # [B, L, 1]
            t = t * (1.0 - w) + self.mask_token.to(t.dtype) * w
        t = torch.cat([self.beit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        if self.beit.pos_embed is not None:
            t = t + self.beit.pos_embed
        return self.beit.pos_drop(t)

    def _blocks(self, t: torch.Tensor) -> list[torch.Tensor]:
        rel = self.beit.rel_pos_bias() if self.beit.rel_pos_bias is not None else None
        outs = []
        for blk in self.beit.blocks:
            t = blk(t, shared_rel_pos_bias=rel)
            outs.append(t)
        return outs

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1 + L, D]``; masked patches see the mask token."""
        return self.beit.norm(self._blocks(self.embed(x, mask))[-1])

    def block_outputs(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + L, D]`` after each of the last ``n`` blocks, each through the final norm."""
        return [self.beit.norm(t) for t in self._blocks(self.embed(x))[-n:]]

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "BeitEncoder has no visible-only forward (relative position bias needs the full grid)"
        )

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int], norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps ``[B, D, H/p, W/p]`` after the blocks in ``indices`` (0-based)."""
        gh, gw = self.grid_size
        outs = []
        for i, t in enumerate(self._blocks(self.embed(x))):
            if i in indices:
                y = self.beit.norm(t) if norm else t
                outs.append(y[:, 1:].transpose(1, 2).reshape(t.shape[0], -1, gh, gw))
        return outs

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """``cls``: the class token; ``avg``: mean of the patch tokens. ``[B, N, D] -> [B, D]``."""
        if pooling == "cls":
            return tokens[:, 0]
        if pooling == "avg":
            return tokens[:, 1:].mean(dim=1)
        raise ValueError(f"unknown pooling '{pooling}': use 'cls' or 'avg'")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, mask)

    # ------------------------------------------------------------------ checkpoints
    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The BEiT's weights under timm's (= BEiT's) key names, no mask token, no head."""
        return {k: v.detach().cpu().clone() for k, v in self.beit.state_dict().items()}

    def save_timm(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write ``{'state_dict': timm keys, 'mimbench': meta}`` atomically (see ViTEncoder)."""
        from harness.core.fsutil import atomic_torch_save

        payload = {
            "state_dict": self.timm_state_dict(),
            "mimbench": {
                "format": "mimbench-encoder",
                "version": 1,
                "family": "beit",
                "encoder": self.cfg.model_dump(mode="json"),
                "beit_options": dict(self.options),
                "timm_name": BEIT_TIMM_NAME,
                "timm_kwargs": self.timm_kwargs,
                **(meta or {}),
            },
        }
        atomic_torch_save(payload, path)

    def load_timm_state_dict(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load timm-keyed weights strictly; a mismatch raises naming the keys."""
        own = self.beit.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        bad = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs encoder {tuple(own[k].shape)}"
            for k in set(own) & set(state_dict)
            if own[k].shape != state_dict[k].shape
        )
        if missing or unexpected or bad:
            raise CheckpointError(
                f"checkpoint {source} does not fit the BEiT encoder (dim {self.embed_dim}, depth "
                f"{self.num_layers}, options {self.options}): missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, shape mismatches {bad[:5]}"
            )
        self.beit.load_state_dict(state_dict, strict=True)
