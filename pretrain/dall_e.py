"""DALL-E's dVAE encoder (Ramesh et al., ICML 2021) as BEiT's tokenizer (Bao et al., ICLR 2022).

The architecture is written here (not imported) with the module and parameter names of OpenAI's
release, so its state dict has the keys of the official ``encoder.pkl``: a 7x7 input conv, four
groups of ``n_blk_per_group`` residual blocks (each a 1x1 id path when widths differ, and a
relu-conv3-relu-conv3-relu-conv3-relu-conv1 residual path scaled by ``1 / n_layers^2``), 2x2 max
pools after the first three groups, and a relu-conv1 to ``vocab_size`` logits; every conv holds
``w`` and ``b``. Inputs are [0, 1] pixels mapped by ``(1 - 2 * 0.1) * x + 0.1``; the token is the
argmax of the logits. BEiT feeds it 112 px images (a 14x14 token grid for 224 px / 16 px patches).

The weights cannot be downloaded here: give their path in ``target.tokenizer.path``. Accepted:
a plain state dict (or ``{'state_dict': ...}``) with these keys, loaded weights-only, or the
official ``encoder.pkl``, a pickled ``dall_e.encoder.Encoder`` module. The latter is read with
torch's weights-only unpickler, with the ``dall_e`` classes mapped to inert stand-ins, so no code
from the file runs and the ``dall_e`` package is not needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import TokenizerConfig
from harness.core.errors import CheckpointError
from pretrain.targets import to_unit
from pretrain.tokenizer_base import TOKENIZERS, Tokenizer

LOGIT_LAPLACE_EPS = 0.1


class Conv2d(nn.Module):
    """DALL-E's conv: parameters ``w`` ``[out, in, k, k]`` and ``b``, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw**2) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """Residual block: ``id_path(x) + post_gain * res_path(x)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DallEEncoder(nn.Module):
    """The dVAE encoder: ``[B, 3, H, W]`` mapped pixels to logits ``[B, vocab, H/8, W/8]``.

    Args:
        n_hid: Width of the first group (official: 256; groups widen 1x, 2x, 4x, 8x).
        n_blk_per_group: Residual blocks per group (official: 2).
        vocab_size: Number of tokens (official: 8192).
    """

    group_count = 4

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        n_layers = self.group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(3, n_hid, 7))]
        for g in range(1, 5):
            blocks: list[tuple[str, nn.Module]] = [
                (
                    f"block_{i + 1}",
                    EncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers),
                )
                for i in range(n_blk_per_group)
            ]
            if g < 4:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
        groups.append(
            (
                "output",
                nn.Sequential(
                    OrderedDict(
                        [
                            ("relu", nn.ReLU()),
                            ("conv", Conv2d(8 * n_hid, vocab_size, 1)),
                        ]
                    )
                ),
            )
        )
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's input map of [0, 1] pixels into ``[eps, 1 - eps]``."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class _Inert(nn.Module):
    """Stand-in for the pickled ``dall_e`` classes: holds their parameters and submodules."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a stand-in for an unpickled dall_e module cannot run")


_DALL_E_NAMES = ("dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d")


def read_dall_e_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's state dict from a state-dict file or the official pickled ``encoder.pkl``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"DALL-E encoder weights not found: {path}. Download encoder.pkl from OpenAI's DALL-E "
            "release on a machine with internet access, or use target.tokenizer.type kmeans, "
            "vqvae or dvae, which the harness trains itself"
        )
    stand_ins = [(_Inert, name) for name in _DALL_E_NAMES]
    modules = [nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity, torch.device]
    try:
        with torch.serialization.safe_globals([*stand_ins, *modules]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {path} as DALL-E encoder weights ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj)
        if all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
    raise CheckpointError(f"{path} holds neither a DALL-E encoder nor its state dict")


def load_dall_e_encoder(path: str | Path) -> DallEEncoder:
    """Build a :class:`DallEEncoder` shaped like the weights in ``path`` and load them strictly."""
    state = read_dall_e_state_dict(path)
    try:
        n_hid = state["blocks.input.w"].shape[0]
        vocab = state["blocks.output.conv.w"].shape[0]
    except KeyError:
        raise CheckpointError(
            f"{path} does not have DALL-E encoder keys (blocks.input.w, blocks.output.conv.w, ...)"
        ) from None
    n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    enc = DallEEncoder(n_hid, n_blk, vocab)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the DALL-E encoder: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return enc


@TOKENIZERS.register("dall_e")
class DallETokenizer(Tokenizer):
    """Tokens from DALL-E's dVAE encoder (8x downsampling of ``input_size`` px inputs)."""

    needs_fit = False

    def __init__(self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, img_size, grid)
        if not cfg.path:
            raise ValueError(
                "target.tokenizer.type dall_e needs the weights: set target.tokenizer.path to "
                "DALL-E's encoder.pkl (it cannot be downloaded at run time), or use type kmeans, "
                "vqvae or dvae, which the harness trains itself"
            )
        if self.down != 8:
            raise ValueError(
                f"DALL-E's encoder downsamples by 8: target.tokenizer.input_size must be 8 x the "
                f"patch grid ({8 * grid[0]} here; BEiT: 112 for 224 px / 16 px patches), got "
                f"{self.input_size}"
            )
        # Held outside the module tree: the 54M frozen weights stay out of the state dict (and
        # of every training checkpoint); the file named in the config is their source.
        self._held = [load_dall_e_encoder(cfg.path).requires_grad_(False).eval()]
        if self.encoder.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"the DALL-E weights have {self.encoder.vocab_size} tokens, target.tokenizer."
                f"vocab_size is {cfg.vocab_size}: make them equal"
            )
        self.fitted.fill_(True)

    @property
    def encoder(self) -> DallEEncoder:
        return self._held[0]

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self._held[0]._apply(fn, recurse)  # .to(device) / .half() reach the held encoder
        return self

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        x = map_pixels(self.resize(to_unit(imgs.float())))
        return self.encoder(x).argmax(dim=1).flatten(1)  # [B, L]

    def fit(self, images: torch.Tensor, log: Callable[[str], None], seed: int = 0) -> None:
        raise RuntimeError("DALL-E's encoder is loaded, not fitted")
