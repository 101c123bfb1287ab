"""Pretraining on data with unreadable images: skipped, counted and named (fatal when strict),
through the same checked ImageFolder loader as the downstream tasks."""

from __future__ import annotations

import json

import pytest

from harness.core.config import DataConfig, PretrainConfig, to_plain
from harness.core.data.datasets import DatasetError
from harness.core.fsutil import config_hash
from harness.core.training import epoch_order
from pretrain.engine import SUMMARY, pretrain


def _cfg(data, strict: bool | None = None, **train):
    t = {"epochs": 1, "warmup_epochs": 0, "batch_size": 4, "base_lr": 1e-3, "lr_base_batch": 4,
         "ckpt_every_steps": 3, "log_every_steps": 1, "num_recon_images": 3, **train}
    d = {"source": str(data), **({} if strict is None else {"strict_data": strict})}
    return PretrainConfig(data=d, encoder={"arch": "vit_micro_32"},
                          recipe={"name": "simmim", "masking": {"mask_patch_size": 16}}, train=t)


def _break(path):
    path.write_bytes(b"not an image at all")


def test_one_corrupt_image_is_skipped_counted_and_named(tiny_imagefolder, tmp_path):
    _break(tiny_imagefolder / "train" / "class1" / "3.png")
    _break(tiny_imagefolder / "val" / "class0" / "0.png")  # the first image of the picture
    lines: list[str] = []
    res = pretrain(_cfg(tiny_imagefolder), tmp_path / "o", log=lines.append)
    assert res.steps == 24 // 4 and math_finite(res.final_loss)
    summary = json.loads((tmp_path / "o" / SUMMARY).read_text())
    assert summary["skipped_images"] == {"train": 1}
    assert summary["skipped_files"] == ["class1/3.png"]
    named = [m for m in lines if "unreadable" in m and "class1/3.png" in m]
    assert len(named) == 1, lines  # named once on the console
    assert res.recon_path is not None and res.recon_path.is_file()  # the bad val image replaced


def test_strict_data_makes_a_corrupt_image_fatal(tiny_imagefolder, tmp_path):
    _break(tiny_imagefolder / "train" / "class2" / "5.png")
    with pytest.raises(DatasetError, match=r"unreadable image .*class2/5\.png"):
        pretrain(_cfg(tiny_imagefolder, strict=True), tmp_path / "o", log=lambda m: None)


def test_a_batch_with_no_readable_image_makes_no_update(tiny_imagefolder, tmp_path):
    _break(tiny_imagefolder / "train" / "class0" / "1.png")
    lines: list[str] = []
    res = pretrain(_cfg(tiny_imagefolder, batch_size=1, lr_base_batch=1, ckpt_every_steps=100),
                   tmp_path / "o", log=lines.append)
    assert res.steps == 24  # the schedule keeps its length: resume maps steps to batches
    history = [json.loads(x) for x in (tmp_path / "o" / "loss.jsonl").read_text().splitlines()]
    assert len(history) == 23 and all(math_finite(h["loss"]) for h in history)
    assert sum("no readable image in the batch" in m for m in lines) == 1


def test_a_split_of_unreadable_images_is_a_clear_error(tiny_imagefolder, tmp_path):
    for f in (tiny_imagefolder / "train").glob("*/*.png"):
        _break(f)
    with pytest.raises(DatasetError, match=r"all 24 images of .*train are unreadable"):
        pretrain(_cfg(tiny_imagefolder), tmp_path / "o", log=lambda m: None)


def test_the_skip_count_survives_a_resume(tiny_imagefolder, tmp_path):
    first = epoch_order(24, 0, 0)[0]  # in the first batch: met before the interruption only
    name = f"class{first // 8}/{first % 8}.png"  # ImageFolder's sorted sample order
    _break(tiny_imagefolder / "train" / name)

    class Interrupt(Exception):
        pass

    def killer(msg: str) -> None:
        if "step 4/" in msg:  # after the step-3 checkpoint
            raise Interrupt

    cfg = _cfg(tiny_imagefolder)
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)
    with pytest.raises(Interrupt):
        pretrain(cfg, tmp_path / "cut", log=killer)
    resumed = pretrain(cfg, tmp_path / "cut", log=lambda m: None)
    a = json.loads((tmp_path / "full" / SUMMARY).read_text())
    b = json.loads((tmp_path / "cut" / SUMMARY).read_text())
    assert a["skipped_files"] == b["skipped_files"] == [name]
    assert a["skipped_images"] == b["skipped_images"] == {"train": 1}
    assert resumed.final_loss == full.final_loss


def test_a_single_class_is_fine_for_pretraining(tiny_imagefolder, tmp_path):
    import shutil

    for split in ("train", "val"):
        for c in ("class1", "class2"):
            shutil.rmtree(tiny_imagefolder / split / c)
    res = pretrain(_cfg(tiny_imagefolder, batch_size=2, lr_base_batch=2), tmp_path / "o",
                   log=lambda m: None)
    assert res.steps == 8 // 2  # 8 images / batch 2, one epoch


def test_strict_data_stays_out_of_existing_config_hashes():
    cfg = _cfg("shapes")
    plain = to_plain(cfg)
    assert "strict_data" not in plain["data"] and "strict_data" not in DataConfig().model_dump()
    # the hash of a config written before the option existed: the same dump, key for key
    before = {"source": "shapes", "num_workers": 0, "eval_crop_pct": 0.875}
    assert {k: plain["data"][k] for k in before} == before
    assert set(plain["data"]) == {*before, "shapes"}
    strict = _cfg("shapes", strict=True)
    assert to_plain(strict)["data"]["strict_data"] is True
    assert config_hash(to_plain(strict)) != config_hash(plain)
    assert PretrainConfig.model_validate(to_plain(strict)).data.strict_data is True  # round trip


def math_finite(x: float) -> bool:
    import math

    return math.isfinite(x)
