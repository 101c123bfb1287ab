"""The robustness suite: its metrics against hand computations, the class-mapping and layout
checks, the hand-over of a saved classifier between stages, the synthetic copies, and a tiny
run end to end whose numbers are checked against the probe's own val accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_imagefolder

from downstream.base import get_task
from downstream.classifier import ClassifierError, read_classifier
from downstream.robustness import (
    ALEXNET_ERR,
    RobustnessConfig,
    RobustnessDataError,
    any_match_accuracy,
    class_targets,
    corruption_layout,
    mean_corruption_error,
    subset_and_full_top1,
)
from harness.core.config import ConfigError, DataConfig, validate_config
from harness.core.data.shapes import ShapesSpec
from harness.core.data.shapes_robust import CORRUPTIONS, LAYOUT, ensure_shapes_robust
from harness.core.records import load_records
from harness.runner import run_suite
from harness.stages import check_plans, plan_stages

# --------------------------------------------------------------------------- metrics by hand


def test_mce_by_hand_on_a_small_table():
    errors = {
        "gaussian_noise": {1: 50.0, 2: 60.0, 3: 70.0, 4: 80.0, 5: 90.0},
        "contrast": {1: 20.0, 2: 20.0, 3: 20.0, 4: 20.0, 5: 20.0},
        "speckle_noise": {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0, 5: 10.0},  # not in the table
    }
    got = mean_corruption_error(errors, {"gaussian_noise": 0.8, "contrast": 0.5})
    # CE = sum of errors / sum of AlexNet's: 350 / (5 * 80) and 100 / (5 * 50)
    assert got["ce"] == pytest.approx({"gaussian_noise": 87.5, "contrast": 40.0})
    assert got["mce"] == pytest.approx((87.5 + 40.0) / 2)
    assert got["mean_error"] == pytest.approx((70.0 + 20.0) / 2)
    assert got["ignored"] == ["speckle_noise"]
    assert mean_corruption_error({"speckle_noise": {1: 5.0}}, ALEXNET_ERR)["mce"] is None


def test_alexnet_table_is_imagenet_c_fifteen():
    assert len(ALEXNET_ERR) == 15
    assert all(0.5 < v < 1.0 for v in ALEXNET_ERR.values())
    assert set(CORRUPTIONS) <= set(ALEXNET_ERR)  # the synthetic copies use its names


def test_any_match_accuracy_by_hand_with_empty_lists():
    preds = [1, 2, 3, 0]
    labels = [[1], [0, 3], [], [0, 5]]  # image 2 is excluded (empty list)
    acc, n = any_match_accuracy(preds, labels)
    assert n == 3
    assert acc == pytest.approx(100 * 2 / 3)  # image 0: hit, image 1: miss, image 3: hit
    assert any_match_accuracy([0, 1], [[], []]) == (0.0, 0)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        any_match_accuracy([0, 1], [[0]])


def test_subset_argmax_and_full_argmax_on_hand_made_logits():
    logits = torch.tensor([
        [5.0, 1.0, 0.0, 2.0],  # target 3: full argmax 0 (miss); over {1, 3}: 3 (hit)
        [0.0, 3.0, 9.0, 1.0],  # target 1: full 2 (miss); subset 1 (hit)
        [0.0, 1.0, 0.0, 4.0],  # target 1: full 3 (miss); subset 3 (miss)
        [0.0, 7.0, 0.0, 1.0],  # target 1: full 1 (hit); subset 1 (hit)
    ])  # fmt: skip
    targets = torch.tensor([3, 1, 1, 1])
    sub, full = subset_and_full_top1(logits, targets, torch.tensor([1, 3]))
    assert sub == pytest.approx(75.0)
    assert full == pytest.approx(25.0)


# --------------------------------------------------------------------------- class mapping


def test_unmapped_classes_are_named():
    classes = ["n001", "n002", "n003"]
    assert class_targets(["n003", "n001"], classes, False, "A") == [2, 0]
    with pytest.raises(RobustnessDataError, match=r"1 class folder\(s\) .*: n999"):
        class_targets(["n001", "n999"], classes, False, "imagenet-a")
    # ImageNet-V2: folders named by class index, mapped by value (not by string order)
    assert class_targets(["0", "1", "2"], classes, True, "v2") == [0, 1, 2]
    with pytest.raises(RobustnessDataError, match="class indices 0..2: 10"):
        class_targets(["0", "10"], classes, True, "v2")


def _sets_root(tmp: Path, data: Path) -> Path:
    """Every set built from copies of the val split (so each metric is known in advance)."""
    val = data / "val"
    root = tmp / "sets"
    classes = sorted(d.name for d in val.iterdir())
    for name in ("imagenet-sketch",):
        shutil.copytree(val, root / name)
    for c in classes[:2]:  # a 2-of-3 class subset
        shutil.copytree(val / c, root / "imagenet-a" / c)
        shutil.copytree(val / c, root / "imagenet-r" / c)
    for i, c in enumerate(classes):
        shutil.copytree(val / c, root / "imagenetv2-matched-frequency-format-val" / str(i))
    for s in range(1, 6):
        shutil.copytree(val, root / "imagenet-c" / "gaussian_noise" / str(s))
    files = sorted((p.name, classes.index(p.parent.name)) for p in val.glob("*/*.png"))
    real = [[y] for _, y in files]
    real[0] = []  # excluded
    (root / "real.json").write_text(json.dumps(real))
    return root


def test_check_data_names_a_set_class_the_classifier_lacks(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    root = _sets_root(tmp_path, data)
    task = get_task("robustness")
    cfg = RobustnessConfig(root=str(root))
    task.check_data(cfg, DataConfig(source=str(data)))  # the good layout passes
    shutil.copytree(data / "val" / "class0", root / "imagenet-r" / "n09999999")
    with pytest.raises(RobustnessDataError, match="imagenet-r: 1 class folder.*n09999999"):
        task.check_data(cfg, DataConfig(source=str(data)))
    shutil.rmtree(root / "imagenet-c" / "gaussian_noise" / "5")
    with pytest.raises(RobustnessDataError, match=r"severity folders \['1', '2', '3', '4'\]"):
        corruption_layout(root / "imagenet-c")
    (root / "real.json").write_text(json.dumps([[0]]))
    with pytest.raises(RobustnessDataError, match="1 label lists but the val split has 6"):
        task.check_data(RobustnessConfig(root=str(root), sets=["real"]),
                        DataConfig(source=str(data)))  # fmt: skip
    with pytest.raises(RobustnessDataError, match="set task.root"):
        task.check_data(RobustnessConfig(sets=["imagenet_a"]), DataConfig(source=str(data)))


def _suite(tmp: Path, data: Path, tasks: list, root: Path | None = None) -> object:
    return validate_config({
        "kind": "suite", "name": "rob", "output_dir": str(tmp / "runs"), "seeds": [0],
        "data": {"source": str(data), "eval_crop_pct": 1.0},
        "encoders": [{"name": "rand", "encoder": {"arch": "vit_micro_32"}}],
        "tasks": tasks,
    })  # fmt: skip


def test_classifier_task_must_be_listed_once_before(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    bad = _suite(tmp_path, data, [{"name": "robustness"}, {"name": "linear_probe"}])
    with pytest.raises(ConfigError, match="reads the output of task 'linear_probe', which is "
                                          "not listed before it"):
        plan_stages(bad)  # type: ignore[arg-type]
    twice = _suite(tmp_path, data, [{"name": "linear_probe"}, {"name": "linear_probe", "epochs": 3},
                                    {"name": "robustness"}])  # fmt: skip
    with pytest.raises(ConfigError, match="is listed 2 times"):
        plan_stages(twice)  # type: ignore[arg-type]


def test_suite_with_an_unmapped_set_fails_before_any_stage_runs(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    root = _sets_root(tmp_path, data)
    shutil.copytree(data / "val" / "class0", root / "imagenet-a" / "dog")
    cfg = _suite(tmp_path, data, [{"name": "linear_probe"},
                                  {"name": "robustness", "root": str(root)}])  # fmt: skip
    with pytest.raises(RobustnessDataError, match="imagenet-a: 1 class folder.*: dog"):
        check_plans([plan_stages(cfg)])  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()


def test_missing_classifier_file_says_which_task_to_rerun(tmp_path):
    with pytest.raises(ClassifierError, match="no saved classifier of task 'finetune'.*runs again"):
        read_classifier(tmp_path, "finetune")


# --------------------------------------------------------------------------- synthetic copies


def test_synthetic_copies_in_the_real_formats(tmp_path):
    spec = ShapesSpec(image_size=16, train_per_class=1, val_per_class=2, seed=3)
    root = ensure_shapes_robust(spec, tmp_path)
    assert root.name.startswith("shapes-robust-")
    assert ensure_shapes_robust(spec, tmp_path) == root  # cached
    assert sorted(p.name for p in (root / LAYOUT["imagenet_v2"]).iterdir()) == [
        str(i) for i in range(8)]  # fmt: skip
    c = corruption_layout(root / LAYOUT["imagenet_c"])
    assert sorted(c) == sorted(CORRUPTIONS)
    real = json.loads((root / LAYOUT["real"]).read_text())
    assert len(real) == 16 and real[15] == [] and all(real[i] for i in range(15))
    assert all(i % 8 in ls for i, ls in enumerate(real) if ls)  # the primary's class is valid
    a = sorted(p.name for p in (root / LAYOUT["imagenet_a"]).iterdir())
    r = sorted(p.name for p in (root / LAYOUT["imagenet_r"]).iterdir())
    assert len(a) == len(r) == 6 and a != r  # two different class subsets
    other = ensure_shapes_robust(ShapesSpec(image_size=16, train_per_class=1, val_per_class=2,
                                            seed=4), tmp_path)  # fmt: skip
    assert other != root


# --------------------------------------------------------------------------- end to end


def test_tiny_run_end_to_end_matches_the_probe(tmp_path):
    """Every set is a copy of val, so each number is the linear probe's own val accuracy: the
    classifier handed over is the probe's chosen head, applied to the images again."""
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=12)
    root = _sets_root(tmp_path, data)
    cfg = _suite(tmp_path, data, [
        {"name": "linear_probe", "epochs": 20, "lrs": [0.3], "cache_dtype": "float32",
         "cache_dir": str(tmp_path / "cache")},
        {"name": "robustness", "root": str(root)},
    ])  # fmt: skip
    records = {r.task.name: r for r in load_records(run_suite(cfg, log=lambda m: None))}  # type: ignore[arg-type]
    probe, rob = records["linear_probe"], records["robustness"]
    assert rob.status == "ok", rob.error
    top1 = probe.metrics["top1"]
    m = {k.split("@")[0]: v for k, v in rob.metrics.items()}
    assert all(k.endswith("@linear_probe") for k in rob.metrics)
    assert m["sketch_top1"] == pytest.approx(top1)
    assert m["v2_top1"] == pytest.approx(top1)
    assert m["c_error"] == pytest.approx(100 - top1)
    assert m["c_mce"] == pytest.approx((100 - top1) / ALEXNET_ERR["gaussian_noise"])
    assert m["a_top1_subset"] >= m["a_top1_full"]
    assert rob.details["sets"]["real"]["excluded"] == 1
    assert rob.details["sets"]["real"]["images"] == 3 * 6 - 1  # val: 6 per class, one excluded
    assert rob.metric_info["c_mce@linear_probe"].higher_is_better is False
    assert rob.config["inputs"] == {"linear_probe": probe.config_hash}


@pytest.mark.slow
def test_attentive_and_finetuned_classifiers_are_handed_over(tmp_path):
    """The attentive probe's head (tokens online, no fp16 cache) and the fine-tuned model read
    back from their stages reproduce their own val top-1 on a copy of val; the encoder the
    suite evaluates is left unchanged."""
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=8)
    root = _sets_root(tmp_path, data)
    sets = {"sets": ["imagenet_sketch", "imagenet_v2"], "root": str(root)}
    cfg = _suite(tmp_path, data, [
        {"name": "attentive_probe", "presets": ["capi"], "lrs": [1e-2], "weight_decays": [0.0],
         "epochs": 3, "batch_size": 8, "token_source": "online"},
        {"name": "robustness", "classifier": "attentive_probe", **sets},
        {"name": "finetune", "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
         "micro_batch_size": 4, "max_steps": 2, "precision": "fp32"},
        {"name": "robustness", "classifier": "finetune", **sets},
    ])  # fmt: skip
    recs = load_records(run_suite(cfg, log=lambda m: None))  # type: ignore[arg-type]
    assert all(r.status == "ok" for r in recs), [r.error for r in recs]
    for clf in ("attentive_probe", "finetune"):
        top1 = next(r for r in recs if r.task.name == clf).metrics["top1"]
        rob = next(r for r in recs if f"v2_top1@{clf}" in r.metrics).metrics
        assert rob[f"sketch_top1@{clf}"] == pytest.approx(top1)
        assert rob[f"v2_top1@{clf}"] == pytest.approx(top1)


def test_robustness_leaves_the_encoder_unchanged(tmp_path):
    from downstream.base import TaskContext
    from downstream.classifier import SavedClassifier, save_classifier
    from downstream.finetune import FinetuneModel
    from harness.core.config import EncoderConfig
    from pretrain.encoders.vit import ViTEncoder

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    root = _sets_root(tmp_path, data)
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    tuned = FinetuneModel(ViTEncoder(EncoderConfig(arch="vit_micro_32")), 3)  # other weights
    save_classifier(tmp_path / "ft", SavedClassifier("finetune", ["class0", "class1", "class2"],
                                                     {"global_pool": True}, tuned.state_dict()))
    ctx = TaskContext(data=DataConfig(source=str(data), eval_crop_pct=1.0), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path / "out", log=lambda m: None,
                      inputs={"finetune": tmp_path / "ft"})  # fmt: skip
    cfg = RobustnessConfig(classifier="finetune", root=str(root), sets=["imagenet_v2"])
    res = get_task("robustness").run(enc, cfg, ctx)
    assert set(res.metrics) == {"v2_top1@finetune"}
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(RobustnessDataError, match="list 'linear_probe' before 'robustness'"):
        get_task("robustness").run(enc, RobustnessConfig(root=str(root)), ctx)


def test_real_json_order_is_file_name_order_not_class_order():
    from types import SimpleNamespace

    from downstream.robustness import val_in_name_order

    # ImageFolder lists class folders first: real.json lists ILSVRC2012_val_<n> by n
    val = SimpleNamespace(samples=[("v/n01/ILSVRC2012_val_00000003.JPEG", 0),
                                   ("v/n01/ILSVRC2012_val_00000004.JPEG", 0),
                                   ("v/n02/ILSVRC2012_val_00000001.JPEG", 1),
                                   ("v/n03/ILSVRC2012_val_00000002.JPEG", 2)])  # fmt: skip
    assert val_in_name_order(val) == [2, 3, 0, 1]  # type: ignore[arg-type]


def test_classifier_must_be_a_task_that_saves_one():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="task 'linear_prob' saves no classifier; did you "
                                              "mean 'linear_probe'"):
        RobustnessConfig(classifier="linear_prob")
    with pytest.raises(ValidationError, match="saves no classifier"):
        RobustnessConfig(classifier="knn")


@pytest.mark.slow
def test_mimbench_eval_robustness_runs_its_classifier_task_first(tmp_path, capsys):
    from harness.cli import main

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    root = _sets_root(tmp_path, data)
    args = ["eval", "robustness", "--encoder", "random:vit_micro_32", "--data", str(data),
            "--out", str(tmp_path / "r"), "--set", f"root={root}", "--set", "sets=[imagenet_v2]",
            "--set", "data.eval_crop_pct=1.0"]  # fmt: skip
    assert main(args) == 0
    recs = {r.task.name: r for r in load_records(tmp_path / "r" / "eval" / "records")}
    assert set(recs) == {"linear_probe", "robustness"}
    assert recs["robustness"].metrics["v2_top1@linear_probe"] == pytest.approx(
        recs["linear_probe"].metrics["top1"])  # fmt: skip
    assert "robustness/v2_top1@linear_probe" in capsys.readouterr().out  # the leaderboard column
    assert main(["eval", "robustness", "--encoder", "random:vit_micro_32", "--data", str(data),
                 "--out", str(tmp_path / "r2"), "--set", "classifier=knn"]) == 2
    assert "saves no classifier" in capsys.readouterr().err


def test_each_robustness_run_is_its_own_stage_keyed_by_its_input(tmp_path):
    from harness.stages import StageFilter

    data = make_imagefolder(tmp_path / "data", classes=3, per_class=4)
    tasks = [{"name": "linear_probe"}, {"name": "robustness"},
             {"name": "attentive_probe"}, {"name": "robustness", "classifier": "attentive_probe"}]
    plan = plan_stages(_suite(tmp_path, data, tasks))  # type: ignore[arg-type]
    (group,) = plan.groups
    lp, rob_lp, ap, rob_ap = group.tasks
    assert rob_lp.inputs == (lp,) and rob_ap.inputs == (ap,)
    assert rob_lp.run_config["inputs"] == {"linear_probe": lp.key}
    assert lp.dir != rob_lp.dir != rob_ap.dir
    # a launcher job selects one run by its key, not every run of the task
    (sel,) = plan.select(StageFilter("rand", 0, "robustness", key=rob_ap.key))
    assert sel.tasks == (rob_ap,)
    # a changed probe config is a new robustness run
    again = plan_stages(_suite(tmp_path, data, [{"name": "linear_probe", "epochs": 7},
                                                {"name": "robustness"}]))  # type: ignore[arg-type]
    assert again.groups[0].tasks[1].key != rob_lp.key
