"""iGPT (Chen et al., ICML 2020): the pixel-token encoder, its BERT and autoregressive objectives,
the codebook it reads and the probe of an intermediate block."""

from __future__ import annotations

import math

import pytest
import torch

import pretrain  # noqa: F401  (registers the recipe parts)
from harness.core.config import EncoderConfig, MaskingConfig, PretrainConfig, RecipeConfig
from harness.core.config.loading import hashed_dump
from harness.core.errors import CheckpointError
from pretrain.encoders import create_encoder, load_encoder
from pretrain.encoders import igpt as igpt_mod
from pretrain.engine import pretrain as run_pretrain
from pretrain.masking import create_masker
from pretrain.model import create_model
from pretrain.recipes import RECIPE_DIR
from pretrain.targets import from_unit

MICRO = EncoderConfig(arch="igpt_micro_8")


def _recipe(name: str) -> RecipeConfig:
    import yaml

    raw = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())["recipe"]
    return RecipeConfig.model_validate(raw)


def _palette(seed: int = 0) -> torch.Tensor:
    return torch.rand(512, 3, generator=torch.Generator().manual_seed(seed))


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    m = create_model(MICRO, _recipe(name))
    m.target.palette.copy_(_palette())
    m.target.fitted.fill_(True)
    m.encoder.set_codebook(m.target.palette)
    return m


def _images(b: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- masks


def test_bert_mask_masks_each_token_with_probability_015_over_many_draws():
    masker = create_masker(MaskingConfig(strategy="bernoulli", ratio=0.15), (32, 32), 1)
    m = masker(400, generator=torch.Generator().manual_seed(0)).float()  # [400, 1024]
    n, p = m.numel(), 0.15
    assert abs(m.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma of the mean
    # each token on its own: the per-image count varies as a binomial's (an exact-count masker
    # would give variance 0), and every position is masked as often as the others
    counts = m.sum(1)
    assert counts.var().item() == pytest.approx(1024 * p * (1 - p), rel=0.25)
    per_pos = m.mean(0)
    assert abs(per_pos.mean().item() - p) < 0.01 and per_pos.std().item() < 0.05


def test_raster_mask_predicts_every_token_and_is_causal():
    masker = create_masker(MaskingConfig(strategy="raster", ratio=0.15), (8, 8), 1)
    assert masker.causal and bool(masker(3).all())
    assert _model("igpt").encoder.causal and not _model("igpt_bert").encoder.causal


# --------------------------------------------------------------------------- attention


def test_causal_attention_never_looks_ahead():
    enc = _model("igpt").encoder.eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    for t in (0, 20, 62):
        changed = ids.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 512
        a, b = enc.forward_ids(ids), enc.forward_ids(changed)
        # output j has read sos and pixels < j: pixel t + 1 reaches outputs t + 2 onwards only
        assert torch.equal(a[:, : t + 2], b[:, : t + 2])
        if t + 2 < 64:
            assert not torch.allclose(a[:, t + 2], b[:, t + 2])


def test_bert_attention_sees_both_sides_and_hides_masked_tokens():
    enc = _model("igpt_bert").encoder.eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 11] = (changed[:, 11] + 7) % 512
    assert not torch.allclose(enc.forward_ids(ids)[:, 10], enc.forward_ids(changed)[:, 10])
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, 11] = True  # a masked token's value is invisible everywhere
    assert torch.equal(enc.forward_ids(ids, mask), enc.forward_ids(changed, mask))


# --------------------------------------------------------------------------- loss


def _black_white(model, rows_black: int) -> torch.Tensor:
    """Images whose first ``rows_black`` rows are black, the rest white, with a codebook whose
    entry 0 is black, 1 is white and the rest mid-grey: ids 0 and 1 by construction."""
    pal = torch.full((512, 3), 0.5)
    pal[0], pal[1] = 0.0, 1.0
    model.target.palette.copy_(pal)
    model.encoder.set_codebook(pal)
    unit = torch.ones(2, 3, 8, 8)
    unit[:, :, :rows_black] = 0.0
    return from_unit(unit)


@pytest.mark.parametrize("name", ["igpt", "igpt_bert"])
def test_loss_on_a_hand_computed_case(name):
    # the head outputs a constant: logit log 3 for cluster 0, 0 for the other 511, so
    # p(0) = 3 / 514 and p(k) = 1 / 514 for k > 0 whatever the input
    m = _model(name).eval()
    imgs = _black_white(m, rows_black=3)  # 24 black (id 0) and 40 white (id 1) pixels
    with torch.no_grad():
        for p in m.head.parameters():
            p.zero_()
        m.head.proj.bias[0] = math.log(3.0)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    if name == "igpt":
        mask[:] = True  # next-pixel prediction: every token
        n0, n1 = 24, 40
    else:
        mask[:, [0, 5, 30, 40, 63]] = True  # two black tokens (0, 5), three white ones
        n0, n1 = 2, 3
    loss = m(imgs, mask).loss.item()
    expect = (n0 * -math.log(3 / 514) + n1 * -math.log(1 / 514)) / (n0 + n1)
    assert loss == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("name", ["igpt", "igpt_bert"])
def test_loss_goes_down_on_a_fixed_batch(name):
    m = _model(name).train()
    imgs = _images(4)
    mask = m.masker(4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = m(imgs, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


# --------------------------------------------------------------------------- codebook


def test_the_codebook_comes_from_the_color_clusters_fit():
    rec = _recipe("igpt_bert")
    tok = rec.target.tokenizer.model_copy(update={"train_images": 16, "kmeans_iters": 2})
    rec = rec.model_copy(update={"target": rec.target.model_copy(update={"tokenizer": tok})})
    m = create_model(MICRO, rec)  # 1024 pixels, 512 clusters, 2 iterations: a fast fit
    with pytest.raises(ValueError, match="not fitted"):
        m.encoder(_images())
    m.prepare(lambda n: _images(n, seed=3), log=lambda s: None)
    assert torch.equal(m.encoder.palette, m.target.palette) and m.encoder.codebook_fitted
    # the encoder's ids are the target's classes
    ids = m.encoder.token_ids(_images())
    assert torch.equal(ids, m.target(_images()).value.squeeze(-1))


def test_a_recipe_whose_target_is_not_the_codebook_is_refused():
    rec = _recipe("igpt_bert").model_copy(update={"target": _recipe("simmim").target})
    with pytest.raises(ValueError, match="color_clusters"):
        create_model(MICRO, rec)
    with pytest.raises(ValueError, match="causal attention.*igpt"):
        create_model(EncoderConfig(arch="vit_micro_32"), _recipe("igpt"))


def test_state_dict_restores_the_codebook_and_an_unfitted_one_is_refused():
    m = _model("igpt")
    fresh = create_model(MICRO, _recipe("igpt"))
    with pytest.raises(CheckpointError, match="never fitted.*delete the checkpoint"):
        fresh.check_restored("ck.pth")
    fresh.load_state_dict(m.state_dict())
    fresh.check_restored("ck.pth")
    assert torch.equal(fresh.encoder.palette, _palette())


def _pretrain_cfg(data) -> PretrainConfig:
    t = {"epochs": 2, "warmup_epochs": 0, "batch_size": 4, "base_lr": 1e-3, "lr_base_batch": 4,
         "ckpt_every_steps": 2, "log_every_steps": 1, "num_recon_images": 2}
    rec = {"name": "igpt", "target": {"tokenizer": {"train_images": 8, "kmeans_iters": 2}}}
    return PretrainConfig(data={"source": str(data)}, encoder={"arch": "igpt_micro_8"},
                          recipe=rec, train=t)


@pytest.mark.slow  # a few pretraining steps through the engine, three times
def test_resume_restores_the_codebook_and_refuses_an_unfitted_one(tmp_path):
    from conftest import make_imagefolder

    data = make_imagefolder(tmp_path / "data", size=8, per_class=4)  # 12 images: 3 steps / epoch
    cfg = _pretrain_cfg(data)

    class Interrupt(Exception):
        pass

    fit_logs: list[str] = []

    def killer(msg: str) -> None:
        fit_logs.append(msg)
        if "step 3/" in msg:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_pretrain(cfg, tmp_path / "o", log=killer)
    assert any("[color_clusters]" in s for s in fit_logs)
    ck_path = tmp_path / "o" / "checkpoint.pth"
    ck = torch.load(ck_path, weights_only=True)
    lines: list[str] = []
    res = run_pretrain(cfg, tmp_path / "o", resume=True, log=lines.append)
    assert not any("[color_clusters]" in s for s in lines)  # restored, not fitted again
    enc = load_encoder(res.encoder_path)
    assert enc.causal and torch.equal(enc.palette, ck["model"]["encoder.palette"])
    assert (tmp_path / "o" / "recon.png").is_file()
    # a checkpoint whose codebook was never fitted: refused, config.yaml untouched
    ck["model"]["encoder.fitted"] = torch.tensor(False)
    torch.save(ck, ck_path)
    before = (tmp_path / "o" / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match="never fitted"):
        run_pretrain(cfg, tmp_path / "o", resume=True, log=lambda s: None)
    assert (tmp_path / "o" / "config.yaml").read_bytes() == before


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "arch, width, depth, heads",
    # openai/image-gpt README: iGPT-S / M / L run with --n_embd, --n_head, --n_layer
    [("igpt_s_32", 512, 24, 8), ("igpt_m_32", 1024, 36, 8), ("igpt_l_32", 1536, 48, 16)],
)
def test_presets_have_the_readmes_shapes_and_parameter_count(arch, width, depth, heads):
    """Built on the meta device (no memory): the reference's parameters, counted from
    ``src/model.py`` (q, k, v, c_proj D x D; c_fc D x 4D and its projection 4D x D; no biases;
    norm gains g only; wte 512 x D, wpe 1024 x D, ln_f D; sos D for the autoregressive model
    only) and the encoder's own."""
    with torch.device("meta"):
        enc = create_encoder(EncoderConfig(arch=arch))
    assert (enc.embed_dim, enc.num_layers, enc.cfg.num_heads) == (width, depth, heads)
    d = width
    per_block = 4 * d * d + 8 * d * d + 2 * d
    expected = depth * per_block + 512 * d + 1024 * d + d + (d if enc.causal else 0)
    assert sum(p.numel() for p in enc.parameters()) == expected


# --------------------------------------------------------------------------- bad input


def test_a_sequence_that_does_not_fit_memory_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(igpt_mod, "memory_budget", lambda: (2**30, "the host's RAM"))
    cfg = EncoderConfig(arch="igpt_s_32", img_size=64)
    need = 24 * 8 * 4096**2 * 4  # depth x heads x L^2 x 4 B
    assert igpt_mod.attention_bytes(4096, 8, 24) == need
    with pytest.raises(ValueError) as err:
        create_encoder(cfg)
    msg = str(err.value)
    assert "L = 64*64 = 4096" in msg and f"{need / 2**30:,.1f} GiB" in msg and "img_size" in msg


def test_patch_size_must_be_one_pixel():
    with pytest.raises(ValueError, match="patch_size must be 1"):
        create_encoder(EncoderConfig(arch="igpt_micro_8", patch_size=2))


# --------------------------------------------------------------------------- probes


def test_block_tokens_read_one_block_through_the_final_norm():
    enc = _model("igpt").encoder.eval()
    x = _images(2)
    blocks = enc.forward_blocks(x)
    assert torch.equal(enc.block_tokens(x, 0), enc.ln_f(blocks[0]))
    assert torch.equal(enc.block_tokens(x, -1), enc.forward_features(x))
    with pytest.raises(ValueError, match="outside the 2 blocks"):
        enc.block_tokens(x, 2)


def test_probe_configs_take_a_block_index_left_out_of_the_hash_when_unset():
    from downstream.knn import KNNConfig
    from downstream.linear_probe import LinearProbeConfig

    assert "block" not in hashed_dump(LinearProbeConfig())
    assert "block" not in hashed_dump(KNNConfig())
    assert hashed_dump(LinearProbeConfig(block=1, last_blocks=[1]))["block"] == 1
    with pytest.raises(ValueError, match="last_blocks: \\[1\\]"):
        LinearProbeConfig(block=1)


def test_features_of_a_block_are_its_pooled_tokens(tmp_path):
    from conftest import make_imagefolder

    from downstream.features import get_features
    from harness.core.data.datasets import eval_transform, imagefolder_checked

    data = make_imagefolder(tmp_path / "d", size=8, per_class=2)
    enc = _model("igpt").encoder.eval()
    ds = imagefolder_checked(data, "train", None, False)
    tf = eval_transform(8, 1.0)
    common = dict(device=torch.device("cpu"), cache_dir=tmp_path / "c", log=None)
    f0 = get_features(enc, ds, "train", tf, 1, block=0, **common)
    last = get_features(enc, ds, "train", tf, 1, **common)
    assert not last.from_cache  # another key than the block's
    imgs = torch.stack([tf(ds.loader(p)) for p, _ in ds.samples])
    with torch.no_grad():
        want = enc.pool(enc.block_tokens(imgs, 0), "avg")
    assert torch.allclose(f0.feats["avg"][:, 0, 0], want, atol=1e-5)
    assert get_features(enc, ds, "train", tf, 1, block=0, **common).from_cache
