"""Recipe files (one complete YAML file per recipe) and axis names checked against the registries
that :mod:`pretrain` fills."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from harness.core.config import (
    LOSSES,
    RECIPES,
    ConfigError,
    PretrainConfig,
    RecipeConfig,
    TrainConfig,
    recipe_file,
    recipe_names,
    to_plain,
    validate_config,
)
from harness.core.config import recipe_files as rf
from harness.core.config.base import StrictModel
from pretrain.losses import Loss

RECIPE_DIR = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"


def _missing(model: type[BaseModel], data: dict, where: str) -> list[str]:
    """Every field of ``model`` (and of its nested schemas) that ``data`` leaves out."""
    out = []
    for name, field in model.model_fields.items():
        if name not in data:
            out.append(f"{where}.{name}")
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, StrictModel):
            out += _missing(sub, data[name], f"{where}.{name}")
    return out


def _raw(name: str) -> dict:
    return yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())


def test_every_recipe_file_is_registered_and_ships_with_pretrain():
    files = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    assert files and recipe_names() == files
    assert all(RECIPES.get(n).parent == RECIPE_DIR for n in files)
    pyproject = (RECIPE_DIR.parents[1] / "pyproject.toml").read_text()
    assert 'pretrain = ["recipes/*.yaml"]' in pyproject  # package data: installed with pretrain


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_recipe_file_sets_every_recipe_and_train_key(name):
    raw = _raw(name)
    missing = _missing(RecipeConfig, raw["recipe"], "recipe") + _missing(TrainConfig, raw["train"], "train")
    assert not missing, f"{name}.yaml leaves out {missing}: they would fall back to a schema default"
    assert raw["recipe"]["name"] == name


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_recipe_file_values_are_the_resolved_values(name):
    # a pretraining config naming only the recipe resolves to exactly the file's values
    # the Context Encoder's conv net; I-JEPA's 384-wide predictor needs an encoder at least as wide
    # Selfie and context prediction encode patches one by one: a conv net (context prediction's
    # paper grid of 96 px patches needs at least 398 px images: 416 = 13 x 32)
    arch = {"context_encoder": "ce_conv_32", "ijepa": "vit_base_16", "igpt": "igpt_micro_8",
            "igpt_bert": "igpt_micro_8", "selfie": "ce_conv_32",
            "context_prediction": "ce_conv_128"}.get(name, "vit_tiny_16")
    enc = {"arch": arch, "img_size": 416} if name == "context_prediction" else {"arch": arch}
    cfg = PretrainConfig(encoder=enc, recipe={"name": name})
    raw = _raw(name)
    expect = RecipeConfig.model_validate(raw["recipe"]), TrainConfig.model_validate(raw["train"])
    assert (cfg.recipe, cfg.train) == expect
    plain = to_plain(cfg)
    assert plain["train"]["betas"] == list(raw["train"]["betas"])
    if raw["recipe"]["encoder_init"] == "default":  # left out of dumps at its default: hashes kept
        assert "encoder_init" not in plain["recipe"]
    else:  # a paper's rule (mae, beit, simmim) or timm's named (iBOT: DINO's ViT init is timm's;
        # data2vec 2.0: no rule of its own; iGPT: its family's own init; CAPI's model.py init is
        # MAE's rule): part of the config and of its hash
        assert plain["recipe"]["encoder_init"] == raw["recipe"]["encoder_init"]
        own = {"ibot": "timm", "capi": "mae", "data2vec2": "timm", "igpt": "timm",
               "igpt_bert": "timm"}
        assert raw["recipe"]["encoder_init"] == own.get(name, name)
    assert "encoder_setup" not in plain["recipe"]  # 'paper' is left out of dumps
    assert ("encoder_defaults" in plain["recipe"]) == (raw["recipe"]["encoder_defaults"] is not None)


def test_user_keys_override_the_recipe_file():
    cfg = PretrainConfig(encoder={"arch": "vit_tiny_16"},
                         recipe={"name": "mae", "masking": {"ratio": 0.5}}, train={"epochs": 3})
    assert cfg.recipe.masking.ratio == 0.5 and cfg.recipe.masking.strategy == "shuffle"
    assert cfg.train.epochs == 3 and cfg.train.warmup_epochs == recipe_file("mae")["train"]["warmup_epochs"]


def test_recipe_file_is_a_copy():
    recipe_file("mae")["train"]["epochs"] = 1
    assert recipe_file("mae")["train"]["epochs"] != 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("recipe: {name: x}\n", "needs exactly the mappings recipe, train"),
        ("recipe: {name: x}\ntrain: {}\nextra: 1\n", "needs exactly the mappings"),
        ("recipe: {name: y}\ntrain: {}\n", "recipe.name is 'y', but the file is registered as recipe 'x'"),
        ("recipe: [1]\ntrain: {}\n", "'recipe' must be a mapping"),
    ],
)
def test_malformed_recipe_file_is_refused(tmp_path, text, match):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        rf._read(path, "x")


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"name": "mea"}, "unknown recipe 'mea'; did you mean 'mae'"),
        ({"name": "mae", "head": {"type": "mae_decodr"}}, r"head\.type: unknown head 'mae_decodr'; did you mean 'mae_decoder'"),
        ({"name": "mae", "masking": {"strategy": "shufle"}}, r"masking\.strategy: unknown masking strategy 'shufle'; did you mean 'shuffle'"),
        ({"name": "mae", "target": {"type": "norm_pixel"}}, r"target\.type: unknown target 'norm_pixel'; did you mean 'norm_pixels'"),
        ({"name": "mae", "loss": {"type": "l3"}}, r"loss\.type: unknown loss 'l3'; did you mean '(l1' or 'l2|l2' or 'l1)'\? known: cross_entropy, l1, l2, smooth_l1"),
        ({"name": "beit", "target": {"tokenizer": {"type": "kmean"}}}, r"tokenizer\.type: unknown tokenizer 'kmean'; did you mean 'kmeans'"),
        ({"name": "mae", "encoder_init": "defualt"}, r"encoder_init: unknown encoder initialisation 'defualt'; did you mean 'default'"),
    ],
)
def test_axis_names_come_from_the_registries(recipe, match):
    with pytest.raises(ConfigError, match=match):
        validate_config({"recipe": recipe}, kind="pretrain")


def test_discrete_pairs_follow_the_registered_classes():
    with pytest.raises(ValueError, match=r"target 'tokens' is discrete: set loss.type: cross_entropy \(got 'l2'\)"):
        RecipeConfig(name="beit", loss={"type": "l2"})
    with pytest.raises(ValueError, match=(r"loss 'cross_entropy' needs a discrete target \(color_bins, color_clusters, "
                                          r"ibot, mean_color, online_clusters, relative_position, selfie, tokens\); target 'pixels' is continuous: use "
                                          r"l1, l2 or smooth_l1")):
        RecipeConfig(name="simmim", loss={"type": "cross_entropy"})


def test_a_registered_loss_is_a_config_value_without_a_schema_edit(monkeypatch):
    class Cosine(Loss):
        pass

    with pytest.raises(ValueError, match="unknown loss 'cosine'"):
        RecipeConfig(name="mae", loss={"type": "cosine"})
    monkeypatch.setitem(LOSSES._items, "cosine", Cosine)
    assert RecipeConfig(name="mae", loss={"type": "cosine"}).loss.type == "cosine"


def test_a_new_recipe_file_is_a_recipe(tmp_path, monkeypatch):
    raw = _raw("mae")
    raw["recipe"]["name"] = "mae_l1"
    raw["recipe"]["loss"]["type"] = "l1"
    path = tmp_path / "mae_l1.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setitem(RECIPES._items, "mae_l1", path)
    cfg = PretrainConfig(encoder={"arch": "vit_tiny_16"}, recipe={"name": "mae_l1"})
    assert cfg.recipe.loss.type == "l1" and cfg.train.betas == (0.9, 0.95)
    assert "mae_l1" in recipe_names()
