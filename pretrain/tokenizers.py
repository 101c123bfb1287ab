"""Discrete visual tokenizers for BEiT-style targets (``target.type: tokens``).

BEiT (Bao et al., ICLR 2022) predicts, for every masked patch, the index of a visual token given
by a tokenizer trained beforehand: DALL-E's dVAE (Ramesh et al. 2021; :mod:`pretrain.dall_e`,
loaded from a weights file) in the paper. So that BEiT runs with nothing downloaded, the harness
also fits tokenizers itself on the training images before pretraining:

* ``kmeans``: a k-means codebook over the pixels of each patch (iGPT's color clusters, Chen et
  al. 2020, applied to whole patches); a patch's token is its nearest centroid.
* ``vqvae``: a small VQ-VAE (van den Oord et al. 2017): conv encoder, nearest-codebook
  quantization with a straight-through gradient, codebook and commitment (0.25) losses.
* ``dvae``: a small discrete VAE in DALL-E's style: the encoder's logits over the vocabulary are
  relaxed by Gumbel-softmax with a temperature annealed from 1 to 1/16, a KL term to the uniform
  prior, and the token is the argmax of the logits.

Every tokenizer maps normalized images ``[B, 3, H, W]`` to tokens ``[B, L]`` on the encoder's
patch grid (the input is resized to ``input_size`` first, so the tokenizer's downsampling is
``input_size / grid``), and is frozen during pretraining. Fitting is seeded and runs under a
forked RNG, so the engine's random stream, and a resumed run, are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.config import TokenizerConfig
from pretrain import dall_e  # noqa: F401  (registers 'dall_e')
from pretrain.targets import patchify, to_unit, unpatchify
from pretrain.tokenizer_base import TOKENIZERS, Tokenizer


def kmeans(points: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (random distinct points when ``k > 512``).

    Args:
        points: ``[N, P]``.
        k: Number of clusters (``<= N``).
        iters: Lloyd iterations.
        generator: Seeds the initialization and the re-seeding of empty clusters.

    Returns:
        Centroids ``[k, P]``.
    """
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} points (the vocabulary), got {n}")
    if k <= 512:
        centers = [points[int(torch.randint(n, (1,), generator=generator))]]
        d2 = ((points - centers[0]) ** 2).sum(1)
        for _ in range(k - 1):
            probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
            c = points[int(torch.multinomial(probs, 1, generator=generator))]
            centers.append(c)
            d2 = torch.minimum(d2, ((points - c) ** 2).sum(1))
        cent = torch.stack(centers)
    else:
        cent = points[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = nearest(points, cent)
        onehot = torch.sparse_coo_tensor(  # [k, N]; a sparse product beats index_add_ on CPU
            torch.stack([assign, torch.arange(n)]),
            torch.ones(n, dtype=points.dtype),
            (k, n),
            check_invariants=False,
        )
        sums = torch.sparse.mm(onehot, points)  # [k, P]
        counts = torch.bincount(assign, minlength=k).to(points.dtype)
        empty = counts == 0
        cent = torch.where(empty.unsqueeze(1), cent, sums / counts.clamp_min(1).unsqueeze(1))
        if bool(empty.any()):  # re-seed empty clusters on random points
            cent[empty] = points[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return cent


def nearest(points: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row for each point, ``[N, P] x [K, P] -> [N]``."""
    c2 = (codebook**2).sum(1)  # [K]
    out = [
        (c2 - 2.0 * points[i : i + chunk] @ codebook.t()).argmin(1)
        for i in range(0, points.shape[0], chunk)
    ]
    return torch.cat(out) if out else points.new_zeros(0, dtype=torch.long)


@TOKENIZERS.register("kmeans")
class KMeansTokenizer(Tokenizer):
    """Nearest centroid of each patch's (normalized) pixels."""

    max_points = 65536

    def __init__(self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, img_size, grid)
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, self.down * self.down * 3))

    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        patches = patchify(self.resize(imgs.float()), self.down)  # [B, L, P]
        b, n, p = patches.shape
        return nearest(patches.reshape(b * n, p), self.codebook).view(b, n)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return to_unit(unpatchify(self.codebook[tokens], self.down, self.grid))

    def fit(self, images: torch.Tensor, log: Callable[[str], None], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        pts = patchify(self.resize(images.float()), self.down).reshape(-1, self.codebook.shape[1])
        if pts.shape[0] > self.max_points:
            pts = pts[torch.randperm(pts.shape[0], generator=g)[: self.max_points]]
        cent = kmeans(pts, self.vocab_size, self.cfg.kmeans_iters, g)
        err = ((pts - cent[nearest(pts, cent)]) ** 2).mean()
        self.codebook.copy_(cent)
        self.fitted.fill_(True)
        log(
            f"[tokenizer kmeans] {self.vocab_size} clusters over {pts.shape[0]} patches, "
            f"mean squared error {float(err):.4f}"
        )


def _conv_stack(hidden: int, n_down: int, out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(n_down):
        layers += [nn.Conv2d(cin, hidden, 4, stride=2, padding=1), nn.ReLU()]
        cin = hidden
    layers += [nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out, 1)]
    return nn.Sequential(*layers)


def _deconv_stack(code_dim: int, hidden: int, n_up: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(code_dim, hidden, 3, padding=1), nn.ReLU()]
    for _ in range(n_up):
        layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(hidden, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class _ConvTokenizer(Tokenizer):
    """Shared conv encoder / decoder of the VQ-VAE and the dVAE."""

    def __init__(
        self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int], enc_out: int
    ) -> None:
        super().__init__(cfg, img_size, grid)
        n = int(round(math.log2(self.down)))
        if 2**n != self.down:
            raise ValueError(
                f"{cfg.type} downsamples by powers of 2; input_size / grid = {self.down}"
            )
        self.enc = _conv_stack(cfg.hidden, n, enc_out)
        self.dec = _deconv_stack(cfg.code_dim, cfg.hidden, n)

    def step_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss and reconstruction of a batch; implemented by subclasses."""
        raise NotImplementedError

    def fit(self, images: torch.Tensor, log: Callable[[str], None], seed: int = 0) -> None:
        c = self.cfg
        images = self.resize(images.float())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            self.init_codes(images[torch.randperm(len(images), generator=g)[: c.batch_size]])
            opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=c.lr)
            self.train()
            rec_err = float("nan")
            for step in range(c.train_steps):
                idx = torch.randint(len(images), (min(c.batch_size, len(images)),), generator=g)
                loss, rec = self.step_loss(images[idx], step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec_err = float(F.mse_loss(rec, images[idx]))
            self.eval()
        self.fitted.fill_(True)
        log(
            f"[tokenizer {c.type}] {c.train_steps} steps on {len(images)} images, "
            f"reconstruction mse {rec_err:.4f}"
        )

    def init_codes(self, x: torch.Tensor) -> None:
        """Optional data-dependent initialization before training."""


@TOKENIZERS.register("vqvae")
class VQVAETokenizer(_ConvTokenizer):
    """A small VQ-VAE: nearest codebook vector per position, straight-through gradients."""

    beta = 0.25  # commitment weight (van den Oord et al.)

    def __init__(self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, img_size, grid, enc_out=cfg.code_dim)
        self.codebook = nn.Embedding(cfg.vocab_size, cfg.code_dim)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        z = self.enc(x)  # [B, d, gh, gw]
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [B*L, d]

    @torch.no_grad()
    def init_codes(self, x: torch.Tensor) -> None:
        z = self._latents(x)
        idx = torch.randint(z.shape[0], (self.vocab_size,))
        self.codebook.weight.copy_(z[idx] + 0.01 * torch.randn_like(z[idx]))

    def step_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        z = self._latents(x)  # [B*L, d]
        zq = self.codebook.weight[nearest(z.detach(), self.codebook.weight)]
        z_st = z + (zq - z).detach()  # straight-through
        gh, gw = self.grid
        rec = self.dec(z_st.view(b, gh, gw, -1).permute(0, 3, 1, 2))
        loss = (
            F.mse_loss(rec, x) + F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        )
        return loss, rec.detach()

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        z = self._latents(self.resize(imgs.float()))
        return nearest(z, self.codebook.weight).view(imgs.shape[0], -1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        zq = self.codebook.weight[tokens].view(tokens.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
        return to_unit(self.dec(zq))


@TOKENIZERS.register("dvae")
class DVAETokenizer(_ConvTokenizer):
    """A small discrete VAE with a Gumbel-softmax relaxation (DALL-E's training scheme)."""

    kl_weight = 1e-3
    tau_start, tau_end = 1.0, 1.0 / 16

    def __init__(self, cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> None:
        super().__init__(cfg, img_size, grid, enc_out=cfg.vocab_size)
        self.embed = nn.Conv2d(cfg.vocab_size, cfg.code_dim, 1, bias=False)  # one-hot -> code

    def step_loss(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        frac = step / max(1, self.cfg.train_steps - 1)
        tau = self.tau_start * (self.tau_end / self.tau_start) ** frac
        logits = self.enc(x)  # [B, K, gh, gw]
        soft = F.gumbel_softmax(logits, tau=tau, dim=1)
        rec = self.dec(self.embed(soft))
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * (logq + math.log(self.vocab_size))).sum(1).mean()  # KL(q || uniform)
        return F.mse_loss(rec, x) + self.kl_weight * kl, rec.detach()

    @torch.no_grad()
    def encode(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.enc(self.resize(imgs.float())).argmax(1).flatten(1)  # [B, L]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid
        onehot = F.one_hot(tokens.view(-1, gh, gw), self.vocab_size).permute(0, 3, 1, 2).float()
        return to_unit(self.dec(self.embed(onehot)))


def create_tokenizer(cfg: TokenizerConfig, img_size: int, grid: tuple[int, int]) -> Tokenizer:
    """Build the tokenizer named by ``cfg.type`` (DALL-E's registers from :mod:`pretrain.dall_e`)."""
    return TOKENIZERS.get(cfg.type)(cfg, img_size, grid)
