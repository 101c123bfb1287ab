"""ImageFolder layout checks: every wrong layout gets a message that says what to fix."""

from __future__ import annotations

import shutil

import pytest

from harness.core.config import DataConfig
from harness.core.data.datasets import DatasetError, imagefolder_checked, resolve_imagefolder_root


def _resolve(path):
    return resolve_imagefolder_root(DataConfig(source=str(path)))


def test_a_good_root_and_its_classes(tiny_imagefolder):
    root = tiny_imagefolder
    assert _resolve(root) == root
    assert imagefolder_checked(root, "val", None).classes == ["class0", "class1", "class2"]


def test_a_split_folder_given_as_the_root_names_the_parent(tiny_imagefolder):
    root = tiny_imagefolder
    with pytest.raises(DatasetError, match=rf"looks like one split .*pass its parent {root}"):
        _resolve(root / "train")


def test_flat_val_folder_says_how_to_sort_it(tiny_imagefolder):
    root = tiny_imagefolder
    for c in ("class0", "class1", "class2"):  # ImageNet's val archive: images directly under val/
        for f in (root / "val" / c).iterdir():
            f.rename(root / "val" / f"{c}_{f.name}")
        (root / "val" / c).rmdir()
    with pytest.raises(DatasetError, match=r"val has no class folders.*unpacks flat"):
        _resolve(root)


def test_empty_class_and_missing_split_are_named(tiny_imagefolder):
    root = tiny_imagefolder
    (root / "train" / "class9").mkdir()
    (root / "train" / "class9" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder\(s\) without images: class9"):
        _resolve(root)
    shutil.rmtree(root / "train" / "class9")
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=r"val is missing: .*train/ and val/"):
        _resolve(root)


def test_images_in_nested_folders_count_as_torchvision_reads_them(tiny_imagefolder):
    root = tiny_imagefolder
    nested = root / "train" / "class1" / "batch0"
    nested.mkdir()
    for f in list((root / "train" / "class1").glob("*.png")):
        f.rename(nested / f.name)
    assert _resolve(root) == root
    assert len(imagefolder_checked(root, "train", None)) == 24


def test_class_folders_must_agree_between_splits(tiny_imagefolder):
    root = tiny_imagefolder
    (root / "val" / "class1").rename(root / "val" / "other")
    with pytest.raises(DatasetError, match=r"class folders differ .*\['class1', 'other'\]"):
        imagefolder_checked(root, "val", None)


def test_a_single_class_is_refused_for_classification_and_named(tiny_imagefolder):
    root = tiny_imagefolder
    for split in ("train", "val"):
        for c in ("class1", "class2"):
            shutil.rmtree(root / split / c)
    with pytest.raises(DatasetError, match=r"val has 1 class folder\(s\) \(class0\).*accuracy"):
        imagefolder_checked(root, "val", None)
    assert len(imagefolder_checked(root, "train", None, min_classes=1)) == 8  # pretraining


def test_skip_tally_counts_names_once_and_refuses_a_split_of_unreadable_files(tiny_imagefolder):
    import torch

    from harness.core.data.datasets import SkipTally, collate_skipping

    root = tiny_imagefolder
    (root / "val" / "class1" / "1.png").write_bytes(b"junk")
    ds = imagefolder_checked(root, "val", None)
    tally, lines = SkipTally(ds, "val"), []
    for _ in range(2):  # two epochs over the same files
        for lo in range(0, len(ds), 5):
            idx = list(range(lo, min(lo + 5, len(ds))))
            _, _, kept = collate_skipping([ds[i] and (torch.zeros(1), ds[i][1]) for i in idx])
            tally.add(idx, kept)
            tally.report(lines.append)
    assert tally.num_skipped == 1 and tally.events == 2 and tally.paths() == ["class1/1.png"]
    assert len(lines) == 1 and "skipped 1 unreadable image(s) of 12: class1/1.png" in lines[0]
    tally.check_readable()  # the others decode
    for f in (root / "val").glob("*/*.png"):
        f.write_bytes(b"junk")
    bad = SkipTally(ds, "val")
    bad.add([0, 1], torch.tensor([False, False]))
    with pytest.raises(DatasetError, match=r"all 12 images of .*val are unreadable"):
        bad.check_readable()
