"""Contract tests over the checkpoint-format registry: every registered format has synthesizers
that write a file of that format from a tiny encoder with known random weights; the file is
auto-detected as that format, imported, and the imported encoder computes the source's features.

A format registered without a synthesizer fails here: add one to :data:`SYNTHESIZERS` (the
layouts themselves live in ``checkpoint_layouts.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_layouts import (
    MICRO,
    aim_layout,
    beit2_layout,
    beit_layout,
    cae_layout,
    capi_layout,
    data2vec2_layout,
    ibot_layout,
    ijepa_layout,
    images,
    mae_layout,
    mmpretrain_layout,
    pretraining_checkpoint,
    random_beit,
    random_released,
    random_swin,
    random_vit,
    randomize,
    simmim_vit_layout,
    swin_original_layout,
)

from downstream.checkpoints import CheckpointFormat, detect_family, load_checkpoint
from downstream.checkpoints.formats.base import Converted, register_format
from downstream.checkpoints.keys import convert_vit_like
from harness.core.config import (
    CHECKPOINT_FORMATS,
    EncoderConfig,
    EncoderEntry,
    checkpoint_format_names,
)
from harness.core.errors import CheckpointError
from pretrain.encoders.beit import BeitEncoder

SWIN_MICRO = EncoderConfig(arch="swin_micro_32")

#: ``(source encoder, the object to save, load_checkpoint kwargs)``; ``None`` as the object: the
#: encoder writes its own file (``save_timm``).
Synthesized = tuple[torch.nn.Module, Any, dict[str, Any]]


def _mimbench_file() -> Synthesized:
    return random_vit(seed=11), None, {}


def _pretraining_checkpoint() -> Synthesized:
    encoder, ckpt = pretraining_checkpoint()
    return encoder, ckpt, {"cfg": MICRO}  # width 32: no public head count, the arch is named


def _timm_with_head() -> Synthesized:
    enc = random_vit(seed=12)
    head = {"head.weight": torch.randn(5, 32), "head.bias": torch.randn(5)}
    return enc, {**enc.timm_state_dict(), **head}, {"cfg": MICRO}


def _mae_release() -> Synthesized:
    enc = random_vit(seed=13)
    return enc, mae_layout(enc), {"cfg": MICRO}


def _beit_release(shared: bool) -> Callable[[], Synthesized]:
    def synth() -> Synthesized:
        enc = random_beit(shared, seed=14)
        return enc, beit_layout(enc), {}

    return synth


def _simmim_vit() -> Synthesized:
    enc = random_beit(shared=True, seed=15)
    return enc, simmim_vit_layout(enc), {}


def _simmim_swin() -> Synthesized:
    enc = random_swin(SWIN_MICRO, seed=16)
    sd = {f"encoder.{k}": v for k, v in swin_original_layout(enc).items()}
    sd["decoder.0.weight"] = torch.randn(3 * 32 * 32, 64, 1, 1)
    return enc, {"model": sd}, {}


def _mmpretrain_beit() -> Synthesized:
    enc = random_beit(shared=False, seed=17)
    return enc, mmpretrain_layout(enc.timm_state_dict()), {}


def _mmpretrain_vit() -> Synthesized:
    enc = random_vit(seed=18)
    return enc, mmpretrain_layout(enc.timm_state_dict()), {"cfg": MICRO}


def _swin_repo() -> Synthesized:
    enc = random_swin(SWIN_MICRO, seed=19)
    sd = swin_original_layout(enc)
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 64), torch.randn(10)
    return enc, {"model": sd}, {}


def _data2vec2(n_pre: int) -> Callable[[], Synthesized]:
    def synth() -> Synthesized:
        enc = random_released("vit_postnorm", seed=21)
        return enc, data2vec2_layout(enc, n_pre), {"cfg": MICRO}

    return synth


def _ijepa() -> Synthesized:
    enc = random_released("vit_avgpool", seed=22)
    return enc, ijepa_layout(enc), {"cfg": MICRO}


def _ibot() -> Synthesized:
    enc = random_vit(seed=23)
    return enc, ibot_layout(enc), {"cfg": MICRO}


def _cae() -> Synthesized:
    opts = {"use_abs_pos_emb": True, "use_rel_pos_bias": False,
            "use_shared_rel_pos_bias": False, "layer_scale": True, "qkv_bias": True}  # fmt: skip
    enc = randomize(BeitEncoder(MICRO, opts), 24)
    return enc, cae_layout(enc), {"cfg": MICRO}


def _beit2() -> Synthesized:
    enc = random_beit(shared=True, seed=25)
    return enc, beit2_layout(enc), {}


#: Format name -> its synthesizers (each variant of the format's layout that maps differently).
SYNTHESIZERS: dict[str, list[Callable[[], Synthesized]]] = {
    "mimbench": [_mimbench_file],
    "mimbench_ckpt": [_pretraining_checkpoint],
    "timm": [_timm_with_head],
    "mae": [_mae_release],
    "beit": [_beit_release(shared=False), _beit_release(shared=True)],
    "simmim": [_simmim_vit, _simmim_swin],
    "mmpretrain": [_mmpretrain_vit, _mmpretrain_beit],
    "swin": [_swin_repo],
    "data2vec2": [_data2vec2(0), _data2vec2(1)],
    "ijepa": [_ijepa],
    "ibot": [_ibot],
    "cae": [_cae],
    "beit2": [_beit2],
}

#: Recognised formats that are refused: format name -> (a file of it, what the refusal names).
REFUSED: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], str]] = {
    "capi": (capi_layout, "rotary position embeddings"),
    "aim": (aim_layout, r"LayerNorm before the sin-cos positions \(preprocessor"),
}


def formats_without_synthesizer() -> list[str]:
    """Registered formats that neither :data:`SYNTHESIZERS` nor :data:`REFUSED` covers."""
    return [n for n in checkpoint_format_names() if not SYNTHESIZERS.get(n) and n not in REFUSED]


LOADING = [n for n in checkpoint_format_names() if n not in REFUSED]


def _write(synth: Callable[[], Synthesized], path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Run ``synth`` and write its checkpoint to ``path``: ``(source encoder, load kwargs)``."""
    source, obj, kwargs = synth()
    if obj is None:
        source.save_timm(path)  # type: ignore[operator]
    else:
        torch.save(obj, path)
    return source, kwargs


def _features(enc: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return enc.eval().forward_features(images())


def test_every_registered_format_has_a_synthesizer():
    assert len(checkpoint_format_names()) >= 8
    assert not formats_without_synthesizer(), (
        f"checkpoint formats registered without a synthesizer: {formats_without_synthesizer()}; "
        "add one to SYNTHESIZERS in tests/downstream/test_checkpoint_formats.py"
    )


@pytest.mark.parametrize("fmt", LOADING)
def test_format_is_detected_imported_and_computes_the_source_features(fmt, tmp_path):
    synths = SYNTHESIZERS.get(fmt)
    assert synths, f"checkpoint format '{fmt}' has no synthesizer in SYNTHESIZERS"
    for i, synth in enumerate(synths):
        path = tmp_path / f"{fmt}_{i}.pth"
        source, kwargs = _write(synth, path)
        got, rep = load_checkpoint(path, **kwargs)  # fmt auto: detected
        assert rep.detected == rep.family == fmt, (synth.__name__, rep.detected)
        assert not rep.missing and not rep.unexpected and not rep.partial
        ref = _features(source)
        out = _features(got)
        assert out.shape == ref.shape
        err = float((out - ref).abs().max())
        assert torch.allclose(out, ref, rtol=0, atol=1e-5), (synth.__name__, err)
        forced, rep = load_checkpoint(path, fmt=fmt, **kwargs)  # the same, named
        assert rep.family == fmt and torch.allclose(_features(forced), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", sorted(REFUSED))
def test_refused_format_is_detected_and_names_the_missing_piece(fmt, tmp_path):
    layout, missing = REFUSED[fmt]
    path = tmp_path / f"{fmt}.pth"
    torch.save(layout(), path)
    assert detect_family(layout()) == fmt
    for named in ("auto", fmt):
        with pytest.raises(CheckpointError, match=missing):
            load_checkpoint(path, fmt=named, cfg=MICRO)


# --------------------------------------------------------------------------- a new format


class _PrefixedTimm(CheckpointFormat):
    """A made-up format: a timm ViT under ``trunk.`` (what a new format's module holds)."""

    name = "prefixed_timm"
    detect_rank = 5

    def detect(self, state, meta, container) -> bool:  # type: ignore[no-untyped-def]
        return any(k.startswith("trunk.") for k in state)

    def convert(self, state, report, meta) -> Converted:  # type: ignore[no-untyped-def]
        return "vit", convert_vit_like({re.sub(r"^trunk\.", "", k): v for k, v in state.items()},
                                       report)


def test_a_new_format_is_one_class_and_one_registration(tmp_path, monkeypatch):
    """Registering a format makes it valid config, auto-detected and imported, and the contract
    above reports it until it has a synthesizer."""
    monkeypatch.setattr(CHECKPOINT_FORMATS, "_items", dict(CHECKPOINT_FORMATS._items))
    with pytest.raises(ValueError, match="unknown checkpoint format 'prefixed_timm'"):
        EncoderEntry(name="e", checkpoint="x.pth", format="prefixed_timm")
    register_format(_PrefixedTimm)
    assert checkpoint_format_names()[-1] == "prefixed_timm"
    assert EncoderEntry(name="e", checkpoint="x.pth", format="prefixed_timm").format == (
        "prefixed_timm"
    )
    assert formats_without_synthesizer() == ["prefixed_timm"]
    enc = random_vit(seed=20)
    state = {f"trunk.{k}": v for k, v in enc.timm_state_dict().items()}
    assert detect_family(state) == "prefixed_timm"
    path = tmp_path / "trunk.pth"
    torch.save(state, path)
    got, rep = load_checkpoint(path, cfg=MICRO)
    assert rep.family == "prefixed_timm"
    assert torch.equal(_features(got), _features(enc))
