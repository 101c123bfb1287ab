"""Context prediction: Unsupervised Visual Representation Learning by Context Prediction
(Doersch, Gupta, Efros, ICCV 2015).

A pair of patches is cut from a 3x3 grid placed in the image: the centre patch and one of its
8 neighbours, uniformly chosen; a shared network embeds each patch and a classifier over the
two embeddings concatenated tells which of the 8 positions the second patch holds relative to
the first (Sec. 3, Fig. 2-3). To keep the task from trivial shortcuts (Sec. 3.1) the patches
are separated by a gap and each is jittered; and against chromatic aberration (a lens shifts
the colour channels by position, which tells where a patch was) the paper tried projection
(shifting green and magenta towards grey) and colour dropping (keeping one channel, the others
replaced by Gaussian noise).

Here:

* :class:`PairSampler` is the model's masker: the engine's seeded generator draws each image's
  grid origin, position label, jitters and kept channels as one ``[B, 7]`` row (the rows stand
  in for the patch masks of the other recipes). Sizes are ``recipe.pairs`` (config validation
  refuses a grid larger than the image, naming the smallest image that fits).
* The shared network is the encoder of the encoder contract applied to each patch on its own
  (a conv encoder: :func:`pretrain.selfie.pool_patches`, the mean of its output map). The paper's
  AlexNet-style trunk up to fc6 is that encoder; what the tasks evaluate is it, on whole images.
* :class:`PairClassifier` (``head.type: pair_classifier``) is the reference's head on the
  concatenated embeddings (cdoersch/deepcontext ``train.py`` ``gen_net``: ``fc7`` and ``fc8``,
  4096 units each with ReLU, then ``fc9``, 8 logits): two hidden layers of ``head.dim``.
* ``recipe.pairs.color``: ``drop`` (per patch one channel kept, the other two Gaussian noise of
  ``noise_std`` times the kept channel's std around the dataset mean, zero after normalisation),
  ``project`` (the harness's reading of the paper's projection: the component of each pixel
  along the green-magenta axis ``(-1, 2, -1) / sqrt(6)`` of RGB in [0, 1] removed, which moves
  those colours towards grey and leaves greys alone), or ``none``.

Not reproduced: the paper's random downsampling of some patches (against pixelation), its
per-image resizing to 150K-450K pixels (images here come at the encoder's size), and its
batch normalisation-free AlexNet trunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import EncoderConfig, HeadConfig, PairsConfig, RecipeConfig
from pretrain.heads import HEADS, Head
from pretrain.model import MIMModel, MIMOutput, register_model
from pretrain.selfie import pool_patches
from pretrain.targets import TARGETS, Target, TargetOut, from_unit, to_unit

#: The 8 neighbours of the centre of a 3x3 grid, ``(row, column)`` offsets, label ``k`` at
#: index ``k`` (row-major, the centre left out, as the paper's Fig. 2 numbers them).
NEIGHBOURS: tuple[tuple[int, int], ...] = (
    (-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1),
)

#: Columns of a pair row drawn by :class:`PairSampler`.
LABEL, Y1, X1, Y2, X2, KEEP1, KEEP2 = range(7)

#: The green-magenta axis of RGB (unit length), orthogonal to grey.
GREEN_MAGENTA = (-1.0 / math.sqrt(6.0), 2.0 / math.sqrt(6.0), -1.0 / math.sqrt(6.0))


class PairSampler:
    """Draws one patch pair per image: ``[B, 7]`` long rows of (label, y1, x1, y2, x2, kept
    channel of patch 1, of patch 2), top-left corners in pixels.

    The grid (3 patches and 2 gaps a side) is placed uniformly where both outer patches stay
    inside the image after the largest jitter; the label is uniform over the 8 neighbours;
    each patch is then moved by a uniform integer in ``[-jitter, jitter]`` in y and in x.

    Args:
        cfg: Patch size, gap, jitter.
        img_size: Side of the (square) image.
    """

    def __init__(self, cfg: PairsConfig, img_size: int) -> None:
        if cfg.min_image_size > img_size:  # config validation says so first, with the fix
            raise ValueError(
                f"pairs need an image of at least {cfg.min_image_size} px, got {img_size}"
            )
        self.cfg = cfg
        self.img_size = img_size
        self.step = cfg.patch_size + cfg.gap  # from one patch's corner to its neighbour's

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c, b = self.cfg, batch_size
        span = 3 * c.patch_size + 2 * c.gap
        hi = self.img_size - span - c.jitter  # largest origin, inclusive
        origin = torch.randint(c.jitter, hi + 1, (b, 2), generator=generator)  # [B, (y, x)]
        label = torch.randint(0, 8, (b,), generator=generator)
        jit = torch.randint(-c.jitter, c.jitter + 1, (b, 4), generator=generator)
        keep = torch.randint(0, 3, (b, 2), generator=generator)
        centre = origin + self.step  # [B, 2]
        offsets = torch.tensor(NEIGHBOURS)[label] * self.step  # [B, 2]
        first, second = centre + jit[:, :2], centre + offsets + jit[:, 2:]
        return torch.cat([label[:, None], first, second, keep], dim=1)  # [B, 7]


def crop(imgs: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, C, H, W]`` and top-left corners ``[B, 2]`` -> patches ``[B, C, size, size]``."""
    r = torch.arange(size, device=imgs.device)
    rows = (corners[:, 0:1] + r)[:, :, None]  # [B, size, 1]
    cols = (corners[:, 1:2] + r)[:, None, :]  # [B, 1, size]
    b = torch.arange(imgs.shape[0], device=imgs.device)[:, None, None]
    return imgs.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)


def drop_colors(
    patches: torch.Tensor, keep: torch.Tensor, noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep channel ``keep[i]`` of patch ``i``; the others become zero-mean Gaussian noise of
    ``noise_std`` times the kept channel's std (the paper's colour dropping)."""
    kept = patches.gather(1, keep.view(-1, 1, 1, 1).expand(-1, 1, *patches.shape[2:]))
    std = kept.flatten(1).std(dim=1).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    noise = torch.randn(patches.shape, generator=generator, device=patches.device)
    out = noise.to(patches.dtype) * (noise_std * std)
    channel = torch.arange(3, device=patches.device).view(1, 3, 1, 1)
    return torch.where(channel == keep.view(-1, 1, 1, 1), patches, out)


def project_colors(patches: torch.Tensor) -> torch.Tensor:
    """Remove each pixel's green-magenta component (RGB in [0, 1], then normalised again)."""
    unit = to_unit(patches.float())
    a = unit.new_tensor(GREEN_MAGENTA).view(1, 3, 1, 1)
    unit = unit - (unit * a).sum(dim=1, keepdim=True) * a
    return from_unit(unit).to(patches.dtype)


@TARGETS.register("relative_position")
class RelativePositionTarget(Target):
    """Which of the 8 neighbours of the first patch the second patch is: the label column of
    the pair rows (:class:`PairSampler`); the model computes it (:class:`ContextPredictionModel`)."""

    discrete_target = True
    needs_pairs = True
    patchwise_encoder = True
    num_classes = 8
    out_dim = 8

    def forward(self, imgs: torch.Tensor) -> TargetOut:
        raise NotImplementedError("the label is drawn with the pair by PairSampler")


@HEADS.register("pair_classifier")
class PairClassifier(Head):
    """The reference's fc7 + fc8 + fc9 over the two patch embeddings concatenated
    (cdoersch/deepcontext ``train.py`` ``gen_net``): ``[B, 2C] -> [B, dim] -> [B, dim] -> [B, 8]``.

    Args:
        encoder: The conv encoder (its width).
        cfg: ``dim``: the hidden width (the reference's fc7 and fc8: 4096).
        out_dim: 8 positions.
        pixel_channels: Unused.
        pred_grid: Unused.
    """

    # never offered for encoder_mode 'visible': it reads no encoder tokens (its model encodes
    # the patches itself), so it is no answer to a recipe that encodes visible patches only
    requires_full_sequence = True
    patch_grid_only = True

    def __init__(
        self,
        encoder: nn.Module,
        cfg: HeadConfig,
        out_dim: int,
        pixel_channels: int | None = None,
        pred_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        c = int(encoder.num_features)
        self.fc7 = nn.Linear(2 * c, cfg.dim)
        self.fc8 = nn.Linear(cfg.dim, cfg.dim)
        self.fc9 = nn.Linear(cfg.dim, out_dim)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tokens``: the pair's embeddings concatenated ``[B, 2C]`` -> logits ``[B, 8]``."""
        return self.fc9(F.relu(self.fc8(F.relu(self.fc7(tokens)))))


@register_model("relative_position")
class ContextPredictionModel(MIMModel):
    """Context prediction from a recipe: :class:`PairSampler` as the masker, the conv encoder
    on each patch, :class:`PairClassifier` on the pair.

    Args:
        encoder_cfg: A conv encoder (config validation refuses others).
        recipe: ``pairs``, ``head`` (``pair_classifier``), ``target.type: relative_position``,
            ``loss.type: cross_entropy``; ``masking`` is not used.
    """

    def __init__(self, encoder_cfg: EncoderConfig, recipe: RecipeConfig) -> None:
        super().__init__(encoder_cfg, recipe)
        assert recipe.pairs is not None  # config validation: the target needs it
        self.pairs = recipe.pairs
        self.masker = PairSampler(recipe.pairs, int(encoder_cfg.img_size))  # type: ignore[assignment,arg-type]

    def patches(self, imgs: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two patches of each pair ``([B, C, p, p], [B, C, p, p])``, colours handled."""
        p = self.pairs.patch_size
        first, second = crop(imgs, pairs[:, Y1:X1 + 1], p), crop(imgs, pairs[:, Y2:X2 + 1], p)
        if self.pairs.color == "drop":
            first = drop_colors(first, pairs[:, KEEP1], self.pairs.noise_std)
            second = drop_colors(second, pairs[:, KEEP2], self.pairs.noise_std)
        elif self.pairs.color == "project":
            first, second = project_colors(first), project_colors(second)
        return first, second

    def logits(self, imgs: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Position logits ``[B, 8]`` of each image's pair."""
        first, second = self.patches(imgs, pairs)
        emb = pool_patches(self.encoder, torch.cat([first, second]))  # [2B, C]
        b = imgs.shape[0]
        return self.head(torch.cat([emb[:b], emb[b:]], dim=1), pairs)

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor, local: torch.Tensor | None = None
    ) -> MIMOutput:
        """``mask`` is the pair rows ``[B, 7]``; ``pred`` the logits ``[B, 1, 8]``, ``target``
        the labels ``[B, 1]`` (``local``: none, validation refuses local crops for this
        target)."""
        logits = self.logits(imgs, mask)
        label = mask[:, LABEL]
        loss = F.cross_entropy(logits.float(), label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        parts = {"rec": loss.detach(), "acc": acc}
        return MIMOutput(loss, logits[:, None], label[:, None], mask, parts=parts)

    @torch.no_grad()
    def visualize(self, imgs: torch.Tensor, out: MIMOutput) -> list[tuple[str, torch.Tensor]]:
        """Rows: original with the pair framed (first blue, second green), the pair on a 3x3
        layout at its true position, and at the predicted one (framed green if right, red if
        wrong)."""
        orig = to_unit(imgs.float())
        pairs = out.mask
        first, second = (to_unit(x.float()) for x in self.patches(imgs, pairs))
        pred = out.pred[:, 0].argmax(-1)
        right = pred == pairs[:, LABEL]
        green, red = orig.new_tensor([0.0, 1.0, 0.0]), orig.new_tensor([1.0, 0.0, 0.0])
        colour = torch.where(right[:, None], green, red)  # [B, 3]
        return [
            ("original", self.framed_pair(orig, pairs)),
            ("true", self.layout(orig, first, second, pairs[:, LABEL], green.expand_as(colour))),
            ("predicted", self.layout(orig, first, second, pred, colour)),
        ]

    def framed_pair(self, orig: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """The image with the first patch framed blue and the second green."""
        img = orig.clone()
        p = self.pairs.patch_size
        for i in range(img.shape[0]):
            for (y, x), c in (((pairs[i, Y1], pairs[i, X1]), (0.0, 0.3, 1.0)),
                              ((pairs[i, Y2], pairs[i, X2]), (0.0, 1.0, 0.0))):
                _frame(img[i], int(y), int(x), p, img.new_tensor(c))
        return img

    def layout(
        self,
        orig: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        label: torch.Tensor,
        colour: torch.Tensor,
    ) -> torch.Tensor:
        """A grey canvas of the image's size: ``first`` in the centre cell of a 3x3 layout,
        ``second`` framed by ``colour`` in cell ``label``."""
        canvas = torch.full_like(orig, 0.5)
        p, cell = self.pairs.patch_size, orig.shape[-1] // 3
        pad = (cell - p) // 2
        for i in range(orig.shape[0]):
            dy, dx = NEIGHBOURS[int(label[i])]
            y0, x0 = cell + pad, cell + pad
            canvas[i, :, y0 : y0 + p, x0 : x0 + p] = first[i]
            y, x = y0 + dy * cell, x0 + dx * cell
            canvas[i, :, y : y + p, x : x + p] = second[i]
            _frame(canvas[i], y, x, p, colour[i])
        return canvas


def _frame(img: torch.Tensor, y: int, x: int, size: int, colour: torch.Tensor) -> None:
    """Draw a one-pixel frame of ``colour`` ``[3]`` around a ``size`` square of ``img`` ``[3, H, W]``."""
    c = colour.view(3, 1)
    img[:, y, x : x + size] = c
    img[:, y + size - 1, x : x + size] = c
    img[:, y : y + size, x] = c
    img[:, y : y + size, x + size - 1] = c
