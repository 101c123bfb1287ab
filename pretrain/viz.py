"""Pictures of masks: one row per masking strategy, one column per sample (``mimbench viz masks``),
and the labelled reconstruction grid of a pretraining run (``recon.png``, one named row per
picture kind: original / masked / prediction / prediction + visible).

Each strategy is drawn at its paper's setting unless a ratio is given: SimMIM's random masking
of 32 px units at 0.6, MAE's shuffle at 0.75, BEiT's blocks at 75 of 196 patches, the Context
Encoder's central square, random blocks and random region at a quarter of the image, and MAE's
grid at 0.75. Masked patches are dark, visible ones light, on the encoder's patch grid.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from harness.core.config import (
    ENCODER_PRESETS,
    ConfigError,
    EncoderConfig,
    MaskingConfig,
    plan_masking,
)
from harness.core.fsutil import atomic_write_bytes
from harness.core.registry import did_you_mean
from pretrain.avgdist import DEFAULT_DRAWS, AvgDist, masking_avgdist
from pretrain.masking import MASKERS, create_masker

PAPER_MASKING: dict[str, dict[str, float | int | None]] = {
    "random": {"ratio": 0.6, "mask_patch_size": 32},
    "shuffle": {"ratio": 0.75},
    "block": {"ratio": 75 / 196},
    "central": {"ratio": 0.25},
    "random_blocks": {"ratio": 0.25},
    "random_region": {"ratio": 0.25},
    "grid": {"ratio": 0.75},
    "ibot_block": {"ratio": 0.3},  # iBOT README: --pred_ratio 0.3 (here without its variance)
    "capi_inverse_block": {"ratio": 0.65},  # CAPI default_pretrain_config.yaml: mask_ratio 0.65
    "bernoulli": {"ratio": 0.15},  # iGPT src/run.py: bert_mask_prob 0.15
    "raster": {"ratio": 0.15},  # iGPT's autoregressive objective: every token (ratio unused)
    # data2vec 2.0 base_images_only_task.yaml: mask_prob 0.8, mask_length 3, mask_prob_adjust 0.07
    "d2v2_inverse_block": {"ratio": 0.8, "block_length": 3, "ratio_adjust": 0.07},
}


def drawn_strategies() -> list[str]:
    """The strategies drawn by default: every registered one but the causal ones (iGPT's
    ``raster`` predicts every token, so its mask hides all and shows nothing)."""
    return [n for n in MASKERS.names() if not MASKERS.get(n).causal]


def mask_rows(
    arch: str = "vit_base_16",
    strategies: list[str] | None = None,
    samples: int = 6,
    ratio: float | None = None,
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """``(label, masks [samples, gh, gw])`` for each strategy on the preset's patch grid."""
    enc = EncoderConfig(arch=arch)
    p = int(enc.patch_size)  # type: ignore[arg-type]
    grid = (int(enc.img_size) // p, int(enc.img_size) // p)  # type: ignore[arg-type]
    rows = []
    for name in strategies or drawn_strategies():
        cfg = paper_masking(name, grid, p, ratio)
        masker = create_masker(cfg, grid, p)
        # hidden from the encoder (I-JEPA's codes: context 0 shows, targets and the rest do not)
        m = masker(samples, generator=torch.Generator().manual_seed(seed)) != 0
        label = f"{name} {masker.num_masked}/{masker.num_patches}"
        rows.append((label, m.view(samples, *grid)))
    return rows


def paper_masking(
    name: str, grid: tuple[int, int], patch_px: int, ratio: float | None = None
) -> MaskingConfig:
    """The masking config of strategy ``name`` drawn by :func:`mask_rows`: its paper's setting
    (:data:`PAPER_MASKING`), ``ratio`` when given, and the model patch as the unit when the
    paper's unit does not fit the image."""
    MASKERS.get(name)  # unknown names fail with a did-you-mean
    kw = dict(PAPER_MASKING.get(name, {}))
    if ratio is not None:
        kw["ratio"] = ratio
    if kw.get("mask_patch_size") is not None:
        try:  # the paper's unit may not fit this encoder's image (or may mask it all)
            plan_masking(MaskingConfig(strategy=name, **kw), grid, patch_px)  # type: ignore[arg-type]
        except ConfigError:
            kw["mask_patch_size"] = None  # then the model's patch is the unit
    return MaskingConfig(strategy=name, **kw)  # type: ignore[arg-type]


def mask_avgdists(
    arch: str = "vit_base_16",
    strategies: list[str] | None = None,
    ratio: float | None = None,
    seed: int = 0,
    draws: int = DEFAULT_DRAWS,
) -> list[tuple[str, AvgDist]]:
    """``(strategy, AvgDist)`` of each strategy of :func:`mask_rows` on the preset's image
    (:func:`pretrain.avgdist.masking_avgdist`, ``draws`` masks each)."""
    enc = EncoderConfig(arch=arch)
    p = int(enc.patch_size)  # type: ignore[arg-type]
    side = int(enc.img_size)  # type: ignore[arg-type]
    return [
        (name, masking_avgdist(paper_masking(name, (side // p, side // p), p, ratio), side, p,
                               draws, seed))
        for name in strategies or drawn_strategies()
    ]


def render_masks(
    rows: list[tuple[str, torch.Tensor]], cell: int = 6, label_w: int = 150
) -> Image.Image:
    """Draw the rows: a label, then each sample's mask (``cell`` px per patch)."""
    samples, gh, gw = rows[0][1].shape
    tile_h, tile_w, gap = gh * cell, gw * cell, 6
    img = Image.new(
        "RGB", (label_w + samples * (tile_w + gap), len(rows) * (tile_h + gap) + gap), "white"
    )
    draw = ImageDraw.Draw(img)
    for r, (label, masks) in enumerate(rows):
        y = gap + r * (tile_h + gap)
        draw.text((4, y + tile_h // 2 - 5), label, fill="black")
        for s in range(samples):
            m = masks[s].numpy().astype(bool)
            tile = np.where(m[..., None], np.array([60, 60, 70]), np.array([225, 232, 240])).astype(
                np.uint8
            )
            tile = tile.repeat(cell, 0).repeat(cell, 1)
            tile[::cell, :] = tile[::cell, :] * 0.85  # faint patch grid
            tile[:, ::cell] = tile[:, ::cell] * 0.85
            img.paste(Image.fromarray(tile), (label_w + s * (tile_w + gap), y))
    return img


def check_mask_args(
    arch: str = "vit_base_16",
    strategies: list[str] | None = None,
    samples: int = 6,
    ratio: float | None = None,
    seed: int = 0,
) -> None:
    """Reject bad arguments of :func:`mask_rows` with one message naming the allowed values.

    Raises:
        ConfigError: An unknown encoder preset (with a did-you-mean), a ratio outside (0, 1),
            or fewer than one sample.
        UnknownNameError: An unknown masking strategy (with a did-you-mean).
    """
    if arch not in ENCODER_PRESETS:
        known = list(ENCODER_PRESETS)
        raise ConfigError(
            f"unknown encoder arch '{arch}';{did_you_mean(str(arch), known)} "
            f"known: {', '.join(known)}"
        )
    for name in strategies or []:
        MASKERS.get(name)  # unknown names fail with a did-you-mean
    if ratio is not None and not 0.0 < ratio < 1.0:  # also rejects NaN
        raise ConfigError(
            f"mask ratio must lie strictly between 0 and 1 (got {ratio}); e.g. 0.75 masks "
            "three patches in four"
        )
    if samples < 1:
        raise ConfigError(f"samples must be at least 1 (got {samples})")


#: How the reconstruction picture names the rows of :meth:`pretrain.model.MIMModel.visualize`.
RECON_ROW_LABELS: dict[str, str] = {"pasted": "prediction + visible", "completion": "bottom half drawn"}


def recon_row_labels(names: list[str]) -> list[str]:
    """The labels drawn beside the reconstruction rows named ``names`` (e.g. ``pasted`` ->
    ``prediction + visible``)."""
    return [RECON_ROW_LABELS.get(name, name) for name in names]


def render_recon_grid(
    rows: list[tuple[str, torch.Tensor]], scale: int = 1, label_w: int = 130, pad: int = 1
) -> Image.Image:
    """Draw the reconstruction rows: a label column, then one tile per image.

    Args:
        rows: ``(name, images [B, 3, H, W] in [0, 1])`` per row, e.g. from
            :meth:`pretrain.model.MIMModel.visualize`; every row holds the same B images.
        scale: Nearest-neighbour upscaling of the tiles (small images stay readable).
        label_w: Width of the label column in pixels.
        pad: White pixels between tiles.

    Returns:
        The RGB picture.
    """
    labels = recon_row_labels([name for name, _ in rows])
    b, _, h, w = rows[0][1].shape
    tile_h, tile_w = h * scale, w * scale
    row_h = max(tile_h, 12)  # the label's text needs ~11 px
    img = Image.new(
        "RGB", (label_w + b * (tile_w + pad) + pad, len(rows) * (row_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(img)
    for r, ((_, images), label) in enumerate(zip(rows, labels, strict=True)):
        y = pad + r * (row_h + pad)
        draw.text((4, y + row_h // 2 - 6), label, fill="black")
        # [B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8
        arr = (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
        arr = arr.astype(np.uint8).repeat(scale, 1).repeat(scale, 2)
        for i in range(b):
            img.paste(Image.fromarray(arr[i]), (label_w + pad + i * (tile_w + pad), y))
    return img


def save_mask_picture(path: str | Path, **kwargs) -> Path:
    """Write the PNG of :func:`mask_rows` (keyword arguments as there) and return its path.

    Raises:
        ConfigError: Bad arguments (see :func:`check_mask_args`), checked before drawing.
    """

    check_mask_args(**kwargs)
    img = render_masks(mask_rows(**kwargs))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def render_series(
    steps: list[int], series: dict[str, list[float]], width: int = 480, height: int = 140
) -> bytes:
    """PNG bytes of one panel per series (each on its own y range, steps on x): the per-step
    target statistics of a latent target (std of the targets, student-teacher cosine).

    Args:
        steps: The x values.
        series: Name -> one value per step (non-finite values are skipped).
        width: Panel width in pixels.
        height: Panel height in pixels.
    """
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    img = Image.new("RGB", (width, height * max(len(series), 1)), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 10, 18, 16
    x_lo, x_hi = (min(steps), max(steps)) if steps else (0, 1)
    for i, (name, values) in enumerate(series.items()):
        y0 = i * height
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if np.isfinite(v)]
        draw.rectangle((left, y0 + top, width - right, y0 + height - bottom), outline="gray")
        if not pts:
            draw.text((left + 4, y0 + 2), f"{name}: no values", fill="black")
            continue
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        span_y, span_x = (hi - lo) or 1.0, (x_hi - x_lo) or 1
        draw.text((left + 4, y0 + 2), f"{name} (last {pts[-1][1]:.4g})", fill="black")
        draw.text((2, y0 + top), f"{hi:.3g}", fill="black")
        draw.text((2, y0 + height - bottom - 10), f"{lo:.3g}", fill="black")
        xy = [
            (left + (s - x_lo) / span_x * (width - left - right),
             y0 + height - bottom - (v - lo) / span_y * (height - top - bottom))
            for s, v in pts
        ]  # fmt: skip
        if len(xy) == 1:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=colors[i % 4])
        else:
            draw.line(xy, fill=colors[i % len(colors)], width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
