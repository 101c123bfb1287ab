"""Config loading: schemas, did-you-mean, extends, overrides, recipe defaults."""

from __future__ import annotations

import pytest
import yaml

from harness.config import (
    RECIPE_DEFAULTS,
    ConfigError,
    PretrainConfig,
    RecipeConfig,
    SuiteConfig,
    apply_overrides,
    dump_config,
    load_config,
    validate_config,
)
from harness.registry import Registry, UnknownNameError

SUITE = {
    "kind": "suite",
    "name": "t",
    "encoders": [{"name": "mae", "pretrain": {"recipe": {"name": "mae"}}}, {"name": "rand"}],
    "tasks": [{"name": "linear_probe"}],
}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_defaults_are_the_papers():
    mae = RecipeConfig(name="mae")
    assert (mae.masking.strategy, mae.masking.ratio, mae.encoder_mode) == ("shuffle", 0.75, "visible")
    assert (mae.head.type, mae.head.depth, mae.head.dim) == ("mae_decoder", 8, 512)
    assert (mae.target.type, mae.loss.type, mae.loss.on) == ("norm_pixels", "l2", "masked")
    sim = RecipeConfig(name="simmim")
    assert (sim.masking.strategy, sim.masking.ratio, sim.masking.mask_patch_size) == ("random", 0.6, 32)
    assert (sim.head.type, sim.target.type, sim.loss.type, sim.encoder_mode) == ("linear", "pixels", "l1", "mask_token")
    # one value overrides, the rest stays the paper's
    ablated = RecipeConfig(name="mae", masking={"ratio": 0.5})
    assert ablated.masking.ratio == 0.5 and ablated.masking.strategy == "shuffle"


def test_train_defaults_follow_the_recipe():
    cfg = validate_config(SUITE)
    assert isinstance(cfg, SuiteConfig)
    t = cfg.encoders[0].pretrain.train
    assert (t.base_lr, t.lr_base_batch, t.betas) == (1.5e-4, 256, (0.9, 0.95))
    p = PretrainConfig(recipe={"name": "simmim"}, train={"epochs": 3})
    assert p.train.lr_base_batch == 512 and p.train.epochs == 3
    assert p.train.betas == tuple(RECIPE_DEFAULTS["simmim"]["train"]["betas"])


def test_unknown_key_gets_did_you_mean_with_its_path():
    bad = {**SUITE, "encoders": [{"name": "m", "pretrain": {"recipe": {"name": "mae", "maskign": {}}}}]}
    with pytest.raises(ConfigError) as e:
        validate_config(bad, source="s.yaml")
    msg = str(e.value)
    assert "encoders.0.pretrain.recipe" in msg and "did you mean 'masking'" in msg


def test_unknown_recipe_task_and_arch_names_suggest():
    for bad, hint in [
        ({**SUITE, "encoders": [{"name": "m", "pretrain": {"recipe": {"name": "simim"}}}]}, "did you mean 'simmim'"),
        ({**SUITE, "tasks": [{"name": "linear_prob"}]}, "did you mean 'linear_probe'"),
        ({**SUITE, "encoders": [{"name": "m", "encoder": {"arch": "vit_tiny_3"}}]}, "did you mean 'vit_tiny_32'"),
    ]:
        with pytest.raises(ConfigError, match=hint):
            validate_config(bad)


def test_wrong_types_and_ranges_are_reported():
    bad = {**SUITE, "encoders": [{"name": "m", "pretrain": {"recipe": {"name": "mae", "masking": {"ratio": 1.5}}}}]}
    with pytest.raises(ConfigError, match=r"encoders\.0\.pretrain\.recipe\.masking\.ratio"):
        validate_config(bad)
    with pytest.raises(ConfigError, match="missing 'kind:'"):
        validate_config({"encoders": []})
    with pytest.raises(ConfigError, match="unique"):
        validate_config({**SUITE, "encoders": [{"name": "a"}, {"name": "a"}]})


def test_extends_merges_one_parent_and_detects_cycles(tmp_path):
    _write(tmp_path / "base.yaml", {**SUITE, "seeds": [0, 1]})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child", "seeds": [5]})
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.seeds == [5] and len(cfg.encoders) == 2
    _write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    _write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    _write(tmp_path / "multi.yaml", {"extends": ["base.yaml", "child.yaml"]})
    with pytest.raises(ConfigError, match="one file path"):
        load_config(tmp_path / "multi.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    path = _write(tmp_path / "s.yaml", SUITE)
    cfg = load_config(path, ["encoders.0.pretrain.train.epochs=7", "seeds=[1, 2]",
                             "tasks.0.lrs=[0.5]", "data.shapes.train_per_class=4"])
    assert cfg.encoders[0].pretrain.train.epochs == 7
    assert cfg.seeds == [1, 2] and cfg.tasks[0].lrs == [0.5]
    assert cfg.data.shapes.train_per_class == 4
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_overrides({"a": [1]}, ["a.3=2"])
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(path, ["encoders.0.pretrain.train.epoch=7"])


def test_resolved_config_round_trips(tmp_path):
    cfg = validate_config(SUITE)
    text = dump_config(cfg)
    again = validate_config(yaml.safe_load(text))
    assert again == cfg
    assert "embed_dim: 128" in text  # presets are resolved into the printed config


def test_registry_did_you_mean():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    assert reg.get("alpha") == 1 and "beta" in reg and reg.names() == ["alpha", "beta"]
    with pytest.raises(UnknownNameError, match="did you mean 'alpha'") as e:
        reg.get("alpah")
    assert "known widgets: alpha, beta" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 3)
