"""The task contract, for every registered task (timm-style tests parametrized over the registry):
its default config validates, ``check_data`` fails naming a missing or malformed dataset and
accepts a good one, a run returns exactly the declared metrics and leaves the encoder's weights
as they were, and ``mimbench bench`` has a step to time.

A task registered without an entry in :data:`TINY_CASES` fails these tests: give it one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from downstream.base import BenchBatch, Task, TaskContext, all_tasks, get_task
from harness.core.config import DataConfig, EncoderConfig, parse_task_config
from harness.core.data.shapes import ShapesSpec, ensure_shapes
from harness.core.data.shapes_depth import ensure_shapes_depth
from harness.core.errors import UserError
from pretrain.encoders.vit import ViTEncoder

MICRO = EncoderConfig(arch="vit_micro_32")  # patch 8, width 32, depth 2
SPEC = ShapesSpec(image_size=8, train_per_class=2, val_per_class=1, scene_size=96,
                  train_scenes=4, val_scenes=2, seed=0)  # fmt: skip


@dataclass(frozen=True)
class TinyCase:
    """How the contract exercises one task.

    Attributes:
        data: The dataset layout the task reads: ``imagefolder``, ``coco``, ``ade20k`` or
            ``nyu`` (NYU-Depth v2's split files) or ``shapes`` (the synthetic dataset itself, e.g.
            with its robustness copies).
        config: Overrides of the default config that make a run take seconds.
        runs: Whether the test runs the task (cheap tasks); the others check config and data.
        slow: The run takes more than a few seconds (marked ``slow``).
    """

    data: str
    config: dict[str, Any] = field(default_factory=dict)
    runs: bool = False
    slow: bool = False


TINY_CASES: dict[str, TinyCase] = {
    "linear_probe": TinyCase("imagefolder", {"lrs": [0.1], "epochs": 1, "batch_size": 8,
                                             "cache_features": False}, runs=True),
    "linear_probe_faithful": TinyCase("imagefolder", {"epochs": 1, "warmup_epochs": 0,
                                                      "batch_size": 8, "micro_batch_size": 4},
                                      runs=True),
    "knn": TinyCase("imagefolder", {"k": 5, "extra_k": [1], "cache_features": False}, runs=True),
    "finetune": TinyCase("imagefolder", {"epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                                         "micro_batch_size": 4, "max_steps": 1}, runs=True,
                         slow=True),
    "attentive_probe": TinyCase("imagefolder", {"presets": ["capi"], "lrs": [1e-3],
                                                "weight_decays": [0.0], "epochs": 1,
                                                "batch_size": 8, "token_source": "online"},
                                runs=True),
    "partial_finetune": TinyCase("imagefolder", {"blocks": [0, 1], "epochs": 1,
                                                 "warmup_epochs": 0, "batch_size": 8,
                                                 "micro_batch_size": 4, "max_steps": 1},
                                 runs=True, slow=True),
    "low_shot": TinyCase("imagefolder", {"fractions": [0.5], "shots": [2], "k": 3,
                                         "l2s": [1e-2], "max_iter": 20,
                                         "cache_features": False}, runs=True),
    "transfer": TinyCase("imagefolder", {"protocols": [{"name": "knn", "k": 3, "extra_k": [],
                                                        "cache_features": False}]}, runs=True),
    "robustness": TinyCase("shapes", {"sets": ["imagenet_v2", "real"]}),  # reads a classifier
    "detection": TinyCase("coco", {"img_size": 64, "max_iters": 1, "batch_size": 1}),
    "segmentation": TinyCase("ade20k", {"crop_size": 64, "max_iters": 1, "batch_size": 2}),
    "linear_seg": TinyCase("ade20k", {"epochs": 1, "batch_size": 2, "lrs": [1e-3]}, runs=True),
    "knn_seg": TinyCase("ade20k", {"k": 3}, runs=True),
    "linear_depth": TinyCase("nyu", {"epochs": 1, "batch_size": 2, "lrs": [1e-3]}, runs=True),
}  # fmt: skip

TASK_NAMES = sorted(all_tasks())


def _case(name: str) -> TinyCase:
    assert name in TINY_CASES, f"task '{name}' is registered without a TinyCase: add one"
    return TINY_CASES[name]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data in every layout (ImageFolder, COCO, ADE20K), generated once."""
    return ensure_shapes(SPEC, cache_root=tmp_path_factory.getbasetemp() / "shapes-cache")


def _good_data(case: TinyCase, imagefolder: Path, shapes: Path) -> DataConfig:
    if case.data == "nyu":  # the depth copy of the same scenes, beside the shapes cache
        source = ensure_shapes_depth(SPEC, cache_root=shapes.parent)
        return DataConfig(source=str(source), eval_crop_pct=1.0)
    if case.data == "shapes":  # generated (with the robustness copies) into the cache
        return DataConfig(source="shapes", shapes=SPEC.to_dict(), eval_crop_pct=1.0)
    source = {"imagefolder": imagefolder, "coco": shapes / "coco",
              "ade20k": shapes / "ade20k" / "ADEChallengeData2016"}[case.data]  # fmt: skip
    return DataConfig(source=str(source), eval_crop_pct=1.0)


def test_every_registered_task_has_a_tiny_case():
    assert TASK_NAMES, "no task registered"
    missing = [t for t in TASK_NAMES if t not in TINY_CASES]
    assert not missing, f"registered without a TinyCase: {missing}"
    assert not set(TINY_CASES) - set(TASK_NAMES), "a TinyCase of a task that is not registered"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_default_config_validates_and_names_the_task(name):
    task = get_task(name)
    default = task.config_cls()
    assert default.name == task.name == name
    assert parse_task_config({"name": name}) == default  # what a suite's bare entry resolves to
    assert type(default).model_validate(default.model_dump(mode="json")) == default
    tiny = parse_task_config({"name": name, **_case(name).config})
    assert isinstance(tiny, task.config_cls)
    assert isinstance(task.version, int) and task.version >= 1
    assert task.metrics and all(isinstance(v, bool) for v in task.metrics.values())
    assert task.metric_names(default) == task.metrics  # what a failed default run declares


@pytest.mark.parametrize("name", TASK_NAMES)
def test_check_data_names_a_missing_dataset_path(name, tmp_path):
    task = get_task(name)
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(UserError, match="does not exist") as err:
        task.check_data(task.config_cls(), DataConfig(source=str(missing)))
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_check_data_names_what_an_empty_directory_lacks(name, tmp_path):
    task = get_task(name)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="missing") as err:
        task.check_data(task.config_cls(), DataConfig(source=str(empty)))
    assert str(empty) in str(err.value)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_check_data_accepts_a_good_dataset(name, tiny_imagefolder, shapes_root):
    case = _case(name)
    task = get_task(name)
    task.check_data(parse_task_config({"name": name, **case.config}),
                    _good_data(case, tiny_imagefolder, shapes_root))


RUNS = [pytest.param(t, marks=[pytest.mark.slow] if TINY_CASES[t].slow else [])
        for t in TASK_NAMES if t in TINY_CASES and TINY_CASES[t].runs]


@pytest.mark.parametrize("name", RUNS)
def test_run_returns_exactly_its_metrics_and_leaves_the_weights(name, tiny_imagefolder,
                                                                shapes_root, tmp_path):
    case = _case(name)
    task = get_task(name)
    torch.manual_seed(0)
    enc = ViTEncoder(MICRO)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    ctx = TaskContext(data=_good_data(case, tiny_imagefolder, shapes_root), seed=0,
                      device=torch.device("cpu"), out_dir=tmp_path / "out", log=lambda m: None)
    cfg = parse_task_config({"name": name, **case.config})
    res = task.run(enc, cfg, ctx)
    assert set(res.metrics) == set(task.metric_names(cfg))
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.metrics.values()), res.metrics
    json.dumps(res.details)  # records store the details as JSON
    after = enc.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name} changed the encoder's weights: {changed}"


def _overrides(task: Task, method: str) -> bool:
    return getattr(type(task), method) is not getattr(Task, method)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_bench_has_a_step_to_time(name):
    task = get_task(name)
    if _overrides(task, "bench_pipeline"):  # times its own (mmengine) iterations
        assert not _overrides(task, "bench_step"), "declare one of bench_step, bench_pipeline"
        return
    torch.manual_seed(0)
    enc = ViTEncoder(MICRO)
    batch = BenchBatch(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]), 4, amp=False)
    step = task.bench_step(enc, batch)
    step()
    step()  # a step can be repeated (the bench times several)

