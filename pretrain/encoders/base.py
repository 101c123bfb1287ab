"""The encoder contract: one base class every encoder family implements and every recipe and
task uses, the ``ENCODERS`` registry of the families, and encoder files (save / load).

A family (ViT, Swin, BEiT, the Context Encoder's conv net) implements the few methods that
depend on its network: the output tokens with an optional mask (:meth:`Encoder.forward_features`),
the per-block outputs before the final norm (:meth:`Encoder.forward_blocks`), the final norm,
layer ids for layer-wise lr decay and the no-weight-decay names. Everything a recipe or a task
derives from those is written once here: pooling (class token, average, MAE's global pool),
the last blocks' features of a linear probe, feature maps for dense heads, patchify, and the
encoder file with its one metadata writer (:meth:`Encoder.file_meta`).

Encoder files are ``{'state_dict': <the trunk's weights under timm's key names>, 'mimbench':
<metadata>}``: timm reads the ``state_dict`` entry, so ``timm.create_model(name,
checkpoint_path=..., **kwargs)`` loads a saved ViT, Swin or BEiT (timm's habit, Wightman 2019).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import EncoderConfig
from harness.core.config.axes import ENCODER_FAMILIES
from harness.core.errors import CheckpointError
from harness.core.fsutil import atomic_torch_save
from harness.core.registry import Registry
from pretrain.encoders.arch import check_architecture
from pretrain.targets import patchify, unpatchify

#: Version of the encoder file's ``mimbench`` metadata.
ENCODER_FILE_FORMAT = "mimbench-encoder"
ENCODER_FILE_VERSION = 1


def apply_mask_token(
    t: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor
) -> torch.Tensor:
    """Replace the masked patch embeddings by ``token`` (SimMIM, BEiT).

    Args:
        t: Patch embeddings ``[B, L, D]``.
        mask: Boolean ``[B, L]``, True where the patch is masked; None leaves ``t`` as it is.
        token: The learned mask token ``[1, 1, D]``.
    """
    if mask is None:
        return t
    w = mask.unsqueeze(-1).to(t.dtype)  # [B, L, 1]
    return t * (1.0 - w) + token.to(t.dtype) * w


@dataclass
class InitParts:
    """The parts of a transformer encoder that the papers' initialisation rules name
    (:mod:`pretrain.inits`); every other weight is reached through the trunk's modules.

    Attributes:
        patch_embed: The patch embedding convolution.
        mask_token: The learned mask token ``[1, 1, D]``.
        class_token: The class token (None for families without one).
        learned_pos_embed: The absolute position embedding when it is learned (None when fixed
            sin-cos or absent).
        residual_out: Per block in depth order, the last linear layer of each residual branch:
            the attention output projection and the MLP's second layer (BEiT's rescaled pair).
        post_norms: Residual post-norms that the family's reference initialises to zero after
            its ``_init_weights`` (SwinV2's ``_init_respostnorm``); empty for pre-norm families.
    """

    patch_embed: nn.Conv2d
    mask_token: nn.Parameter
    class_token: nn.Parameter | None = None
    learned_pos_embed: nn.Parameter | None = None
    residual_out: list[tuple[nn.Linear, nn.Linear]] = field(default_factory=list)
    post_norms: list[nn.LayerNorm] = field(default_factory=list)


class Encoder(nn.Module, metaclass=ABCMeta):
    """Base class of every encoder family.

    Tokens are ``[B, P + N, D]``: ``P = num_prefix_tokens`` class tokens, then ``N`` output
    tokens in row-major order over :attr:`feature_grid`.

    Args:
        cfg: Encoder config (preset plus overrides).
        options: Family switches that the config does not hold (keys of
            :attr:`option_defaults`; BEiT's relative position bias, layer scale, ...).

    Attributes:
        family: The registry name of the family.
        num_prefix_tokens: Class tokens before the patch tokens (1 for ViT / BEiT, else 0).
        isotropic: Every block outputs the grid and width of the output (ViT, BEiT), so the
            last blocks can be read as features; hierarchical families (Swin, conv) cannot.
        visible_only: Can encode the visible patches alone (MAE's encoder).
        token_input: Can run from given patch embeddings (:meth:`patch_tokens` then
            :meth:`forward_tokens`, ViT's masked patch prediction corrupts them in between).
        resizable_input: Can encode images of another side than ``img_size`` (a multiple of
            the patch size), its position embedding interpolated to their grid
            (:meth:`forward_resized`: iBOT's local crops).
        full_grid_reason: Why a family without a visible-only forward needs every patch.
        option_defaults: The family's options and their defaults (stored in encoder files).
        tokenizes_pixels: The family reads each pixel as an id of a colour-cluster codebook that
            the harness fits before pretraining (iGPT, :mod:`.igpt`): the model hands it the
            ``color_clusters`` target's palette (:meth:`set_codebook`).
    """

    family: ClassVar[str]
    num_prefix_tokens: ClassVar[int] = 0
    isotropic: ClassVar[bool] = False
    visible_only: ClassVar[bool] = False
    token_input: ClassVar[bool] = False
    resizable_input: ClassVar[bool] = False
    full_grid_reason: ClassVar[str] = "it needs every patch"
    option_defaults: ClassVar[dict[str, bool]] = {}
    tokenizes_pixels: ClassVar[bool] = False

    def __init__(self, cfg: EncoderConfig, options: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        options = dict(options or {})
        unknown = set(options) - set(self.option_defaults)
        if unknown:
            raise ValueError(
                f"unknown {self.family} option(s) {sorted(unknown)}; known: "
                f"{tuple(self.option_defaults)}"
            )
        self.cfg = cfg
        self.options = {k: bool(options.get(k, v)) for k, v in self.option_defaults.items()}
        self.patch_size: int = int(cfg.patch_size)  # type: ignore[arg-type]
        self.embed_dim: int = int(cfg.embed_dim)  # type: ignore[arg-type]
        self.grid_size: tuple[int, int] = (0, 0)  # the patch grid, set by the family
        self.num_patches = 0

    def _set_grid(self, grid: tuple[int, int]) -> None:
        self.grid_size = (int(grid[0]), int(grid[1]))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    # ------------------------------------------------------------------ what a family implements
    @property
    @abstractmethod
    def trunk(self) -> nn.Module:
        """The network whose state dict is the encoder file's (timm's model; no mask token)."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Number of blocks (over all stages): layer ids run from 0 to ``num_layers + 1``."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output tokens after the final norm, ``[B, P + N, D]``.

        Args:
            x: Images ``[B, C, H, W]``.
            mask: Optional boolean ``[B, L]`` over the patch grid, True where the patch is
                masked: the mask token replaces its embedding (conv: the mean pixel).
        """

    @abstractmethod
    def forward_blocks(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Tokens after each block before the final norm, ``[B, P + N_i, D_i]`` per block (per
        stage for hierarchical families, whose blocks change the grid within a stage)."""

    @abstractmethod
    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay group of parameter ``name`` (an ``encoder.`` prefix is ignored):
        0 = embeddings, ``i + 1`` = block ``i``, ``num_layers + 1`` = the top (final norm)."""

    @abstractmethod
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norms."""

    @abstractmethod
    def residual_blocks(self) -> list[nn.Module]:
        """The residual blocks in depth order (stochastic depth rises along them)."""

    def final_norm(self, t: torch.Tensor) -> torch.Tensor:
        """The norm after the last block (identity for families without one)."""
        return t

    def init_parts(self) -> InitParts:
        """The parts an initialisation rule names (transformer families); see :class:`InitParts`."""
        raise ValueError(
            f"a {self.family} encoder has no transformer parts to initialise: use encoder_init: timm"
        )

    def set_codebook(self, palette: torch.Tensor) -> None:
        """Take a fitted colour-cluster codebook ``[K, 3]`` (families that ``tokenizes_pixels``)."""
        raise ValueError(f"a {self.family} encoder reads pixels, not colour-cluster ids")

    @property
    def codebook_fitted(self) -> bool:
        """Whether the codebook the encoder reads is fitted (True: a family without one)."""
        return True

    def block_grid(self, index: int) -> tuple[int, int]:
        """Grid of :meth:`forward_blocks` entry ``index`` (isotropic families: the output's)."""
        return self.feature_grid

    def timm_architecture(self) -> tuple[str, dict[str, Any]]:
        """``(timm model name, kwargs)`` that rebuild the trunk in timm (``''`` if not timm's)."""
        return self.cfg.timm_name, dict(self.cfg.timm_kwargs())

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the visible patches only (MAE), ``[B, P + K, D]``; see ViT."""
        raise ValueError(
            f"a {self.family} encoder has no visible-only forward ({self.full_grid_reason}): "
            "encoder_mode 'visible' works with ViT encoders only; use encoder_mode: mask_token"
        )

    def forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        """Output tokens after the final norm of unmasked images of another side than
        ``img_size`` (if ``resizable_input``), ``[B, P + N', D]`` over their own grid."""
        raise ValueError(
            f"a {self.family} encoder takes {self.cfg.img_size} px images only (no position "
            "embedding interpolation): local crops (recipe.local_crops) need a ViT encoder; "
            "set recipe.local_crops: 0"
        )

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[B, L, D]`` before mask token and position (if ``token_input``)."""
        raise ValueError(f"a {self.family} encoder does not run from given patch embeddings")

    def forward_tokens(self, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward_features` from patch embeddings ``[B, L, D]`` (if ``token_input``)."""
        raise ValueError(f"a {self.family} encoder does not run from given patch embeddings")

    # ------------------------------------------------------------------ the output side
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
        """Grid of the output tokens after the prefix tokens."""
        return self.grid_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(x, mask)

    def _check_input(self, x: torch.Tensor) -> None:
        exp = (int(self.cfg.img_size),) * 2  # type: ignore[arg-type]
        if tuple(x.shape[-2:]) != exp:
            raise ValueError(
                f"encoder expects {exp[0]}x{exp[1]} images, got {x.shape[-2]}x{x.shape[-1]}: "
                "set the data transform to the encoder's img_size (or encoder.img_size)"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, L, p*p*C]`` over the encoder's patch grid."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, channels: int = 3) -> torch.Tensor:
        """``[B, L, p*p*C] -> [B, C, H, W]``, the inverse of :meth:`patchify`."""
        return unpatchify(x, self.patch_size, self.grid_size, channels)

    # ------------------------------------------------------------------ pooling and features
    @property
    def poolings(self) -> tuple[str, ...]:
        """``('cls', 'avg')`` with a class token, ``('avg',)`` without."""
        return ("cls", "avg") if self.num_prefix_tokens > 0 else ("avg",)

    def pool(self, tokens: torch.Tensor, pooling: str) -> torch.Tensor:
        """``cls``: the class token, ``avg``: the mean output token; ``[B, P + N, D] -> [B, D]``.

        Raises:
            ValueError: for a pooling the family lacks (``cls`` without a class token).
        """
        if pooling not in self.poolings:
            raise ValueError(
                f"a {self.family} encoder pools with {' or '.join(map(repr, self.poolings))}, "
                f"not '{pooling}'" + (" (it has no class token)" if pooling == "cls" else "")
            )
        if pooling == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def global_pool(self, x: torch.Tensor, fc_norm: nn.Module | None = None) -> torch.Tensor:
        """MAE's ``global_pool`` features ``[B, D]`` (``models_vit.py``, He et al., CVPR 2022):
        the mean of the patch tokens *before* the final norm, through ``fc_norm``.

        Args:
            x: Images ``[B, C, H, W]``.
            fc_norm: The fine-tuned ``fc_norm``; None is the linear probe's, which stays at its
                init: a LayerNorm without affine (eps 1e-6).

        Families without a class token pool as their own heads do: the mean of the normed output
        tokens, without ``fc_norm``.
        """
        if self.num_prefix_tokens == 0:
            return self.pool(self.forward_features(x), "avg")
        t = self.forward_blocks(x)[-1]  # [B, P + N, D], no final norm
        pooled = t[:, self.num_prefix_tokens :].mean(dim=1)  # [B, D]
        if fc_norm is not None:
            return fc_norm(pooled)
        return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)

    @property
    def num_feature_blocks(self) -> int:
        """How many last blocks :meth:`last_blocks` reads: all of an isotropic encoder, else 1."""
        return self.num_layers if self.isotropic else 1

    def last_blocks(self, x: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Tokens after each of the last ``n`` blocks through the final norm, ``n x [B, P+N, D]``
        (``n = 1``: the output tokens; more needs an isotropic family)."""
        if n == 1:
            return [self.forward_features(x)]
        if n > self.num_feature_blocks:
            raise ValueError(
                f"{type(self).__name__} has {self.num_feature_blocks} readable block(s), not {n}: "
                "use last_blocks [1]"
            )
        return [self.final_norm(t) for t in self.forward_blocks(x)[-n:]]

    def block_tokens(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Tokens after block ``index`` (0-based; negative counts from the last) through the final
        norm, ``[B, P + N, D]``: a linear probe of an intermediate block (iGPT's best features lie
        mid-network, Chen et al. 2020, Sec. 4.2). Isotropic families only (every block has the
        output's width and grid).

        Raises:
            ValueError: a hierarchical family, or an index outside the blocks.
        """
        n = self.num_layers
        if not self.isotropic:
            raise ValueError(
                f"a {self.family} encoder changes its width between stages: a block index needs "
                "an isotropic encoder (ViT, BEiT, iGPT); leave block unset"
            )
        if not -n <= index < n:
            raise ValueError(f"block {index} is outside the {n} blocks of '{self.cfg.arch}' "
                             f"(0 to {n - 1}, or -{n} to -1 from the last)")
        return self.final_norm(self.forward_blocks(x)[index])

    def forward_intermediates(
        self, x: torch.Tensor, indices: list[int], norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps ``[B, D_i, H_i, W_i]`` after the blocks (stages) in ``indices`` (0-based),
        in depth order; ``norm`` puts them through the final norm where its width fits (every
        block of an isotropic encoder, the last stage of a hierarchical one)."""
        outs = self.forward_blocks(x)
        maps: list[torch.Tensor] = []
        for i, t in enumerate(outs):
            if i not in indices:
                continue
            if norm and (self.isotropic or i == len(outs) - 1):
                t = self.final_norm(t)
            gh, gw = self.block_grid(i)
            t = t[:, self.num_prefix_tokens :]  # [B, N_i, D_i]
            maps.append(t.transpose(1, 2).reshape(t.shape[0], -1, gh, gw))
        return maps

    # ------------------------------------------------------------------ encoder files
    def file_meta(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``mimbench`` metadata of an encoder file: every writer of one calls this.

        Holds the format and its version, the family, the encoder config, the family's options
        (``<family>_options``), the timm architecture and ``extra`` (e.g. the recipe).
        """
        name, kwargs = self.timm_architecture()
        meta: dict[str, Any] = {
            "format": ENCODER_FILE_FORMAT,
            "version": ENCODER_FILE_VERSION,
            "family": self.family,
            "encoder": self.cfg.model_dump(mode="json"),
            "timm_name": name,
            "timm_kwargs": kwargs,
        }
        if self.option_defaults:
            meta[f"{self.family}_options"] = dict(self.options)
        return {**meta, **(extra or {})}

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """The trunk's weights under timm's key names (no mask token, no head), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.trunk.state_dict().items()}

    def save_timm(self, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
        """Write ``{'state_dict': timm keys, 'mimbench': file_meta(meta)}`` atomically.

        Only tensors and plain types are stored, so it loads weights-only (:func:`load_encoder`).
        """
        atomic_torch_save(
            {"state_dict": self.timm_state_dict(), "mimbench": self.file_meta(meta)}, path
        )

    def load_timm_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
        """Load timm-keyed weights strictly; a mismatch raises naming the keys and the fix."""
        own = self.trunk.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shape_bad = sorted(
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs encoder {tuple(own[k].shape)}"
            for k in set(own) & set(state_dict)
            if tuple(own[k].shape) != tuple(state_dict[k].shape)
        )
        if missing or unexpected or shape_bad:
            parts = []
            if shape_bad:
                parts.append("shape mismatches: " + "; ".join(shape_bad[:5]))
            if missing:
                parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
            opts = f", options {self.options}" if self.options else ""
            raise CheckpointError(
                f"checkpoint {source} does not fit {self.family} encoder '{self.cfg.arch}' "
                f"(embed_dim={self.embed_dim}, depth={self.num_layers}, patch={self.patch_size}, "
                f"img={self.cfg.img_size}{opts}): "
                + " | ".join(parts)
                + ". Fix: set the suite's encoder to the architecture the checkpoint was trained "
                "with."
            )
        self.trunk.load_state_dict(dict(state_dict), strict=True)


#: The families (core's registry, so config validation can read their class attributes).
ENCODERS: Registry[type[Encoder]] = ENCODER_FAMILIES


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    """Class decorator: register a family under its ``family`` name."""
    ENCODERS.register(cls.family, cls)
    return cls


def create_encoder(
    cfg: EncoderConfig, family: str | None = None, options: Mapping[str, Any] | None = None
) -> Encoder:
    """A new encoder of ``family`` (default: the config's, ``cfg.family``) from the registry.

    Args:
        cfg: Encoder config.
        family: A registered family; BEiT shares the ViT presets, so it is named here.
        options: The family's switches (:attr:`Encoder.option_defaults`).

    Raises:
        UnknownNameError: for an unknown family, with a did-you-mean.
    """
    return ENCODERS.get(family or cfg.family)(cfg, options)


def _read_encoder_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state dict, mimbench meta or None)`` of an encoder file, read weights-only."""
    if not path.is_file():
        raise CheckpointError(f"encoder checkpoint not found: {path}: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise CheckpointError(
            f"cannot load {path} weights-only ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "only checkpoints holding tensors and plain types are accepted"
        ) from None
    meta = obj.get("mimbench") if isinstance(obj, dict) else None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    return state, meta if isinstance(meta, dict) else None


def _file_config(
    path: Path, meta: dict[str, Any] | None, cfg: EncoderConfig | None
) -> EncoderConfig:
    """The config to build: the file's recorded one, checked against ``cfg`` when both exist.

    A file without metadata needs ``cfg`` (its number of heads is not in the weights).
    """
    if not meta or not isinstance(meta.get("encoder"), dict):
        if cfg is None:
            raise CheckpointError(
                f"{path} is not a mimbench encoder file (no 'mimbench' metadata), so its "
                "architecture is unknown (the number of heads is not in the weights): give the "
                "encoder config it was trained with (a suite's 'encoder: {arch: ...}' or --arch)"
            )
        return cfg
    recorded = EncoderConfig.model_validate(meta["encoder"])
    if cfg is not None:
        check_architecture(cfg, recorded, str(path), img_size=True)
    return recorded


def load_encoder(path: str | Path, cfg: EncoderConfig | None = None) -> Encoder:
    """An encoder of any family from an encoder file (or from a plain timm state dict and ``cfg``).

    The architecture is the file's own (its metadata: config, family, options); a given ``cfg``
    must name the same one (every shape field and the image size), or the load is refused
    naming both. Files are loaded weights-only: one that needs arbitrary unpickling is refused.
    """
    path = Path(path)
    state, meta = _read_encoder_file(path)
    enc_cfg = _file_config(path, meta, cfg)
    family = str((meta or {}).get("family") or enc_cfg.family)  # files before 'family': cfg's
    options = (meta or {}).get(f"{family}_options") or {}
    enc = create_encoder(enc_cfg, family, options)
    enc.load_timm_state_dict(state, str(path))
    return enc
