"""The fast decode path of the training crops: JPEGs decoded straight to uint8 tensors, or at
reduced size where the random crop is downscaled anyway, resized with torch's uint8 kernels,
shipped as uint8 and normalised on the device.

:class:`DraftRandomResizedCrop` draws its crop box exactly as torchvision's
``RandomResizedCrop.get_params`` does, on the full image size read from the file's header (the
same torch RNG draws: with the same seed it picks the same box and the same flip as the slow
path), then takes one of three routes:

* ``draft`` (a JPEG whose box keeps at least twice the output in both sides): libjpeg's
  DCT-domain reduced decode (PIL's ``Image.draft``: scale 1/2, 1/4 or 1/8) as small as keeps the
  box at least as large as the output, the box mapped onto the reduced image (sub-pixel, through
  ``Image.resize(box=...)``) and resized (bicubic). Decoding at 1/s of the size costs about
  1/s^2 of the IDCT and colour work; libjpeg's scaled IDCT is an area-like downscale, so the
  pixels differ slightly from a full decode followed by bicubic resizing.
* ``tensor`` (any other RGB or greyscale JPEG): torchvision's ``decode_jpeg`` (libjpeg-turbo,
  the same pixels as PIL's decode, without PIL's chunked reads and RGB copy), the box taken as a
  view (no copy) and resized by ``torch.nn.functional.interpolate(..., antialias=True)`` on the
  uint8 tensor: PIL's resampling (the same bicubic kernel, a = -0.5, widened by the downscale
  factor) in torch's vectorised uint8 kernel, within rounding of PIL's ``resize`` (mean absolute
  difference about 0.05 grey levels on ImageNet-sized crops; the test states the bound). Where
  the helper of :mod:`~harness.core.data.jpegcrop` is built, only the box is decoded
  (libjpeg-turbo's partial decode: the same pixels as the box of a full decode). On
  ImageNet-sized JPEGs at 224 px every crop takes this route; decode plus resize cost about
  half of PIL's (``mimbench bench data``; results/bench/issue15_data_cpu.txt).
* ``pil`` (not a JPEG, or a JPEG in another mode, e.g. CMYK): the slow path's decode, crop and
  resize, pixel for pixel.

That is why ``data.fast_decode`` is part of a run's config. The papers' pretraining transform
(MAE ``main_pretrain.py``, SimMIM ``data_simmim.py``: RandomResizedCrop, bicubic, horizontal
flip, ImageNet normalisation) becomes :func:`fast_pretrain_transform` (uint8 out) +
:func:`to_device_normalized` in the training step; the fine-tuning transform (timm's
``transforms_imagenet_train``) keeps its later stages (RandAugment, normalisation, random
erasing) behind the draft crop (:func:`with_draft_crop`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from harness.core.data import jpegcrop
from harness.core.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from harness.core.data.imagefolder import LazyDecode

#: libjpeg's scaled decodes (PIL's ``draft`` picks among these).
DRAFT_SCALES = (8, 4, 2)

_PIL_INTERP = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
}
#: torch's names of the same filters (with ``antialias=True``: PIL's resampling).
_TORCH_INTERP = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
#: The JPEG modes that ``decode_jpeg`` turns into RGB exactly as PIL's ``convert("RGB")`` does.
_TENSOR_MODES = ("RGB", "L")


class DraftRandomResizedCrop(LazyDecode):
    """RandomResizedCrop (and an optional horizontal flip) decoding JPEGs at reduced size or
    straight to tensors (the routes are in the module docstring).

    Args:
        size: Output side in pixels.
        scale: Range of the crop's area as a fraction of the image's (torchvision's ``scale``).
        ratio: Range of the crop's aspect ratio (torchvision's ``ratio``).
        hflip: Flip horizontally with probability 1/2 (drawn after the box, as the slow path's
            ``RandomHorizontalFlip`` following the crop).
        interpolation: Bicubic (the papers') or bilinear.
        output: ``uint8`` (a ``[3, size, size]`` uint8 tensor, normalised later on the device)
            or ``pil`` (an RGB image, for transforms that continue on PIL images).
        crop_decode: On the ``tensor`` route, decode only the box where the JPEG crop decoder
            is available (:mod:`~harness.core.data.jpegcrop`: the same pixels as decoding the
            whole image, faster); False always decodes the whole image.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
        output: str = "uint8",
        crop_decode: bool = True,
    ) -> None:
        if output not in ("uint8", "pil"):
            raise ValueError(f"output must be 'uint8' or 'pil', got {output!r}")
        self.crop_decode = crop_decode
        if crop_decode:  # build / load it here, before loader workers start, not in each
            jpegcrop.library()
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.hflip, self.output = hflip, output
        self.resample = _PIL_INTERP[interpolation]
        self.torch_mode = _TORCH_INTERP[interpolation]
        self.last_box: tuple[int, int, int, int] | None = None  # (top, left, h, w): for tests
        self.last_draft = 1  # the reduction of the last decode (1: full size)
        self.last_route = ""  # the route of the last image: draft, tensor or pil
        self.last_decode = ""  # on the tensor route: box (the crop decoder) or full

    def __repr__(self) -> str:
        return (f"DraftRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip}, output={self.output})")  # fmt: skip

    def __call__(self, img: Image.Image) -> Any:
        """Crop, resize and flip ``img`` (opened, not yet decoded)."""
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)  # type: ignore[arg-type]
        flip = self.hflip and bool(torch.rand(1) < 0.5)
        self.last_box = (top, left, h, w)
        self.last_draft = self.draft_scale(h, w) if img.format == "JPEG" else 1
        fp = img.fp if isinstance(img, ImageFile.ImageFile) else None  # None once loaded
        jpeg = img.format == "JPEG" and img.mode in _TENSOR_MODES
        if self.last_draft == 1 and jpeg and fp is not None:
            self.last_route = "tensor"
            fp.seek(0)
            data = bytearray(fp.read())
            width = img.size[0]
            img.close()
            x = self._tensor_crop(data, top, left, h, w, width)  # [3, S, S] uint8
            if flip:
                x = x.flip(-1)
            return x if self.output == "uint8" else Image.fromarray(x.permute(1, 2, 0).numpy())
        out = self._pil_crop(img, top, left, h, w)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.output == "pil":
            return out
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)  # [3, S, S]

    def _tensor_crop(self, data: bytearray, top: int, left: int, h: int, w: int,
                     width: int) -> torch.Tensor:  # fmt: skip
        """The box of a JPEG file's bytes decoded by libjpeg-turbo to a tensor (the box alone
        where :mod:`~harness.core.data.jpegcrop` can, else the whole image) and resized by
        torch (uint8)."""
        box = jpegcrop.decode_box(data, top, left, h, w, width) if self.crop_decode else None
        self.last_decode = "box" if box is not None else "full"
        if box is None:
            try:
                x = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError as exc:  # truncated or corrupt: PIL raises OSError for these
                raise OSError(f"JPEG does not decode: {str(exc).splitlines()[-1]}") from None
            box = x[:, top : top + h, left : left + w]  # [3, h, w], a view
        out = F.interpolate(box[None], size=(self.size, self.size), mode=self.torch_mode,
                            antialias=True)  # fmt: skip
        return out[0]

    def _pil_crop(self, img: Image.Image, top: int, left: int, h: int, w: int) -> Image.Image:
        """The box resized to the output by PIL: from a reduced decode (``last_draft`` > 1),
        else exactly the slow path's crop + resize."""
        full_w = img.size[0]
        drafted = None
        if self.last_draft > 1:  # PIL picks the scale min(W // w', H // h') allows: ask for W // s
            size = (full_w // self.last_draft, img.size[1] // self.last_draft)
            drafted = img.draft("RGB", size)
        # the full image's width in the reduced image's pixels (libjpeg: W / scale, unrounded)
        f = 1.0 if drafted is None else drafted[1][2] / full_w
        self.last_draft = round(1 / f)
        self.last_route = "draft" if self.last_draft > 1 else "pil"
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.last_draft == 1:  # no reduction: the slow path, pixel for pixel
            crop = img.crop((left, top, left + w, top + h))
            return crop.resize((self.size, self.size), self.resample)
        box = (left * f, top * f, (left + w) * f, (top + h) * f)
        return img.resize((self.size, self.size), self.resample, box=box)

    def draft_scale(self, h: int, w: int) -> int:
        """The largest libjpeg reduction (8, 4, 2; 1: none) that keeps an ``h x w`` box at least
        the output size in both sides."""
        return next((s for s in DRAFT_SCALES if min(h, w) / s >= self.size), 1)


def fast_pretrain_transform(
    img_size: int, crop_scale: tuple[float, float], hflip: bool
) -> DraftRandomResizedCrop:
    """The fast path of :func:`harness.core.data.datasets.pretrain_transform`: the same crop
    and flip draws, uint8 out (normalise with :func:`to_device_normalized`)."""
    return DraftRandomResizedCrop(img_size, scale=crop_scale, hflip=hflip)


def with_draft_crop(transform: transforms.Compose) -> transforms.Compose:
    """timm's training transform with its leading RandomResizedCrop decoding at reduced size
    (the same size, scale, ratio and interpolation; the flip and the later stages unchanged).

    Raises:
        ValueError: The transform does not start with timm's ``RandomResizedCropAndInterpolation``.
    """
    first = transform.transforms[0]
    if not isinstance(first, RandomResizedCropAndInterpolation):
        raise ValueError(f"expected timm's RandomResizedCropAndInterpolation first, got {first!r}")
    interp = first.interpolation
    mode = interp if isinstance(interp, InterpolationMode) else InterpolationMode.BICUBIC
    crop = DraftRandomResizedCrop(first.size[0], first.scale, first.ratio, hflip=False,
                                  interpolation=mode, output="pil")  # fmt: skip
    return transforms.Compose([_Composed(crop, transforms.Compose(transform.transforms[1:]))])


class _Composed(LazyDecode):
    """A draft crop followed by transforms on its PIL output (the whole is a LazyDecode)."""

    def __init__(self, crop: DraftRandomResizedCrop, rest: Any) -> None:
        self.crop, self.rest = crop, rest

    def __call__(self, img: Image.Image) -> Any:
        return self.rest(self.crop(img))

    def __repr__(self) -> str:
        return f"{self.crop!r} then {self.rest!r}"


def to_device_normalized(imgs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``: uint8 ``[B, 3, H, W]`` (the fast path) is normalised there,
    ``(x / 255 - mean) / std`` in float32 as ``ToTensor`` + ``Normalize`` compute it on the
    CPU; a float batch (already normalised) is only moved."""
    imgs = imgs.to(device, non_blocking=True)
    if imgs.dtype != torch.uint8:
        return imgs
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return imgs.float().div_(255).sub_(mean).div_(std)  # in place: no temporaries


def loader_options(num_workers: int, device: torch.device, prefetch: int = 4) -> dict[str, Any]:
    """DataLoader options of the fast path: pinned memory on a GPU, and with workers,
    persistent workers and ``prefetch`` batches in flight per worker."""
    opts: dict[str, Any] = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=prefetch)
    return opts
