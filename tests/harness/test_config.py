"""Config loading: schemas, did-you-mean, extends, overrides, recipe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.core.config import (
    ConfigError,
    PretrainConfig,
    RecipeConfig,
    SuiteConfig,
    apply_overrides,
    dump_config,
    load_config,
    recipe_file,
    validate_config,
)
from harness.core.registry import Registry, UnknownNameError

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
    # 8 px units on the default 32 px encoder (SimMIM's 32 px would be one unit: rejected)
    p = PretrainConfig(recipe={"name": "simmim", "masking": {"mask_patch_size": 8}},
                       train={"epochs": 3})
    assert p.train.lr_base_batch == 512 and p.train.epochs == 3
    assert p.train.betas == tuple(recipe_file("simmim")["train"]["betas"])


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


# --------------------------------------------------------------------------- masking geometry

# (strategy, encoder preset, mask_patch_size, ratio, the numbers the message must give, verdict)
# 32 px images: vit_micro_32 has 8 px patches (4x4), vit_tiny_32 4 px patches (8x8).
DEGENERATE_MASKS = [
    # SimMIM's default 32 px unit on a 32 px image: one unit, ceil(0.6 x 1) = 1 masks it all
    ("random", "vit_micro_32", 32, 0.6, "32x32 px image (8 px patches) has a 1x1 grid of "
     "1 unit(s); ratio 0.6 masks ceil(0.6 x 1) = 1 of them", "every patch"),
    ("random", "vit_tiny_32", 16, 0.8,
     "has a 2x2 grid of 4 unit(s); ratio 0.8 masks ceil(0.8 x 4) = 4", "every patch"),
    ("shuffle", "vit_micro_32", None, 0.95,
     "has a 4x4 grid of 16 unit(s); ratio 0.95 masks 16 - int(16 x (1 - 0.95)) = 16",
     "every patch"),
    ("block", "vit_micro_32", 16, 0.9, "ratio 0.9 masks round(0.9 x 4) = 4", "every patch"),
    ("block", "vit_micro_32", 16, 0.1, "ratio 0.1 masks round(0.1 x 4) = 0", "no patch"),
    ("random_blocks", "vit_micro_32", 16, 0.9, "ratio 0.9 masks round(0.9 x 4) = 4", "every patch"),
    ("random_region", "vit_micro_32", 16, 0.1, "ratio 0.1 masks round(0.1 x 4) = 0", "no patch"),
    ("central", "vit_micro_32", 16, 0.9,
     "ratio 0.9 masks round(sqrt(0.9) x 2) x round(sqrt(0.9) x 2) = 4", "every patch"),
    ("central", "vit_micro_32", 16, 0.05,
     "ratio 0.05 masks round(sqrt(0.05) x 2) x round(sqrt(0.05) x 2) = 0", "no patch"),
    ("grid", "vit_micro_32", 32, 0.75, "k=2 needs a unit grid divisible by 2, got 1x1", None),
]


def _pretrain_raw(strategy, arch, mps, ratio):
    masking = {"strategy": strategy, "ratio": ratio, "mask_patch_size": mps}
    return {"kind": "pretrain", "encoder": {"arch": arch},
            "recipe": {"name": "simmim", "masking": masking}}


def _suggested_fix(msg: str, where: str) -> tuple[str, object]:
    """The first ``set KEY to VALUE`` of a message, as (key below ``where``, value)."""
    import re

    m = re.search(rf"set {re.escape(where)}\.(\w+) to (?:a value from )?([0-9.]+)", msg)
    assert m, msg
    return m.group(1), yaml.safe_load(m.group(2))


@pytest.mark.parametrize("strategy,arch,mps,ratio,numbers,verdict", DEGENERATE_MASKS,
                         ids=[f"{c[0]}-{c[3]}" for c in DEGENERATE_MASKS])
def test_masking_that_hides_every_patch_or_none_is_rejected_with_the_numbers(
    strategy, arch, mps, ratio, numbers, verdict
):
    # standalone pretraining config
    raw = _pretrain_raw(strategy, arch, mps, ratio)
    with pytest.raises(ConfigError) as e:
        validate_config(raw, source="p.yaml")
    msg = str(e.value)
    assert "recipe.masking:" in msg and numbers in msg, msg
    if verdict is not None:
        assert verdict in msg
    # the fix it names validates
    key, value = _suggested_fix(msg, "recipe.masking")
    raw["recipe"]["masking"][key] = value
    validate_config(raw)
    # the same check on a suite's pretrained encoder, with the entry's path
    entry = {"name": "m", "encoder": {"arch": arch},
             "pretrain": {"recipe": _pretrain_raw(strategy, arch, mps, ratio)["recipe"]}}
    with pytest.raises(ConfigError) as e:
        validate_config({**SUITE, "encoders": [entry]}, source="s.yaml")
    msg = str(e.value)
    assert "encoders.0" in msg and "pretrain.recipe.masking:" in msg and numbers in msg, msg
    key, value = _suggested_fix(msg, "pretrain.recipe.masking")
    entry["pretrain"]["recipe"]["masking"][key] = value
    validate_config({**SUITE, "encoders": [entry]})


@pytest.mark.parametrize(
    "masking,numbers",
    [
        ({"strategy": "random", "mask_patch_size": 12}, "mask_patch_size 12 must be a multiple of "
         "the model patch size 8"),
        ({"strategy": "block", "mask_patch_size": 24},
         "mask_patch_size 24 does not tile the 32x32"),
        ({"strategy": "shuffle", "mask_patch_size": 16}, "shuffle masking works on single patches"),
        ({"strategy": "grid", "ratio": 0.6, "mask_patch_size": None}, "1 - 1/k^2"),
    ],
)
def test_masking_units_that_do_not_fit_the_image_are_rejected(masking, numbers):
    raw = {"kind": "pretrain", "encoder": {"arch": "vit_micro_32"},
           "recipe": {"name": "simmim", "masking": {"ratio": 0.5, **masking}}}
    with pytest.raises(ConfigError, match="recipe.masking: ") as e:
        validate_config(raw)
    assert numbers in str(e.value)


def test_masker_counts_are_the_validated_counts_never_clamped():
    """The masker draws what validation computed; a count of 0 is an error there too (it was
    silently raised to 1 unit: 25 % instead of the 10 % asked for)."""
    import torch

    from harness.core.config import MaskingConfig, plan_masking
    from pretrain.masking import create_masker

    with pytest.raises(ConfigError, match=r"round\(0.1 x 4\) = 0"):
        create_masker(MaskingConfig(strategy="block", ratio=0.1, mask_patch_size=16), (4, 4), 8)
    for strategy, ratio in [("random", 0.6), ("shuffle", 0.75), ("block", 0.4), ("central", 0.25),
                            ("random_blocks", 0.4), ("random_region", 0.4), ("grid", 0.75)]:
        cfg = MaskingConfig(strategy=strategy, ratio=ratio, min_block_patches=2)
        plan = plan_masking(cfg, (8, 8), 4)
        mask = create_masker(cfg, (8, 8), 4)(5, generator=torch.Generator())
        assert (mask.sum(1) == plan.num_masked).all(), strategy
        assert 0 < plan.num_masked < 64


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted([*(CONFIGS / "pretrain").glob("*.yaml"), *(CONFIGS / "suites").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.parametrize("override", ["seeds=[-1]", "seeds=[0,0]", "data.shapes.seed=-3"])
def test_negative_or_repeated_seeds_are_rejected(override):
    """A negative seed crashed deep in numpy / torch; a repeated one silently ran once."""
    with pytest.raises(ConfigError) as exc:
        load_config(Path(__file__).parents[2] / "configs/suites/demo.yaml", [override])
    assert "seed" in str(exc.value)
