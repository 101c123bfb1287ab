"""A recipe's encoder definition (``recipe.encoder_defaults``) and initialisation, and the
controlled comparison one value away (``recipe.encoder_setup`` / the suite's ``encoder_setup``)."""

from __future__ import annotations

import pytest

import downstream  # noqa: F401  (registers the checkpoint formats and tasks a suite validates)
from harness.core.config import PretrainConfig, SuiteConfig, to_plain
from harness.core.fsutil import pretrain_config_hash

VIT = {"arch": "vit_tiny_16"}


def _cfg(recipe: dict, **encoder) -> PretrainConfig:
    return PretrainConfig(encoder={**VIT, **encoder}, recipe=recipe)


@pytest.mark.parametrize("name", ["beit", "simmim"])
def test_beit_and_simmim_vits_default_to_their_papers_definition(name):
    enc = _cfg({"name": name}).encoder
    assert (enc.pos_embed, enc.rel_pos_bias, enc.layer_scale, enc.family) == (
        "none", "shared", 0.1, "beit"
    )


def test_mae_keeps_the_plain_vit_with_maes_init():
    cfg = _cfg({"name": "mae"})
    assert cfg.recipe.encoder_init == "mae" and cfg.encoder.family == "vit"
    assert (cfg.encoder.pos_embed, cfg.encoder.rel_pos_bias, cfg.encoder.layer_scale) == (
        "sincos", "none", None
    )


def test_a_field_the_user_sets_wins_and_survives_a_round_trip():
    cfg = _cfg({"name": "beit"}, rel_pos_bias="none", pos_embed="learned")
    assert (cfg.encoder.rel_pos_bias, cfg.encoder.pos_embed, cfg.encoder.layer_scale) == (
        "none", "learned", 0.1
    )
    plain = to_plain(cfg)
    assert plain["encoder"]["rel_pos_bias"] == "none"  # written although plain: the recipe differs
    again = PretrainConfig.model_validate(plain)
    assert again == cfg and pretrain_config_hash(to_plain(again)) == pretrain_config_hash(plain)


def test_swin_keeps_its_own_definition_under_simmim():
    cfg = PretrainConfig(encoder={"arch": "swin_tiny_192"}, recipe={"name": "simmim"})
    assert cfg.encoder.family == "swin" and cfg.encoder.layer_scale is None
    assert cfg.recipe.encoder_init == "simmim"


@pytest.mark.parametrize("name", ["mae", "beit", "simmim"])
def test_controlled_is_one_value_away(name):
    paper = _cfg({"name": name})
    ctl = _cfg({"name": name, "encoder_setup": "controlled"})
    assert ctl.recipe.encoder_init == "timm" and ctl.recipe.encoder_defaults is None
    assert ctl.encoder == PretrainConfig(encoder=VIT, recipe={"name": "mae"}).encoder
    assert to_plain(ctl)["recipe"]["encoder_setup"] == "controlled"
    assert pretrain_config_hash(to_plain(ctl)) != pretrain_config_hash(to_plain(paper))
    assert PretrainConfig.model_validate(to_plain(ctl)) == ctl


def test_controlled_with_a_recipe_value_for_the_encoder_is_refused():
    with pytest.raises(ValueError, match="encoder_init is 'beit': remove encoder_init"):
        _cfg({"name": "beit", "encoder_setup": "controlled", "encoder_init": "beit"})
    with pytest.raises(ValueError, match="encoder_defaults is given: remove it"):
        _cfg({"name": "simmim", "encoder_setup": "controlled",
              "encoder_defaults": {"layer_scale": 0.1}})  # fmt: skip


def test_visible_only_with_relative_position_bias_is_refused_at_validation():
    with pytest.raises(ValueError, match="defined over the full patch grid: set encoder.rel_pos_bias"):
        _cfg({"name": "mae"}, rel_pos_bias="per_block")


def _suite(setup: str | None, entry_setup: str | None = None) -> SuiteConfig:
    recipe = {"name": "beit"} | ({"encoder_setup": entry_setup} if entry_setup else {})
    data = {
        "kind": "suite", "encoders": [
            {"name": "b", "encoder": VIT, "pretrain": {"recipe": recipe}},
            {"name": "s", "encoder": VIT, "pretrain": {"recipe": {"name": "simmim"}}},
            {"name": "r", "encoder": VIT},
        ],
        "tasks": [{"name": "knn"}],
    } | ({"encoder_setup": setup} if setup else {})  # fmt: skip
    return SuiteConfig.model_validate(data)


def test_suite_level_switch_controls_every_pretrained_encoder():
    paper, ctl = _suite(None), _suite("controlled")
    assert [e.encoder.family for e in paper.encoders] == ["beit", "beit", "vit"]
    assert [e.encoder.family for e in ctl.encoders] == ["vit", "vit", "vit"]
    assert all(e.pretrain.recipe.encoder_init == "timm" for e in ctl.encoders if e.pretrain)
    assert "encoder_setup" not in to_plain(paper) and to_plain(ctl)["encoder_setup"] == "controlled"
    assert SuiteConfig.model_validate(to_plain(ctl)) == ctl
    with pytest.raises(ValueError, match="sets recipe.encoder_setup 'paper' but the suite's"):
        _suite("controlled", entry_setup="paper")
