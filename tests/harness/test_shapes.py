"""Tests of the embedded synthetic "shapes" dataset (harness/core/data/shapes.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.core.data import shapes
from harness.core.data.shapes import (
    CLASSES,
    GENERATOR_VERSION,
    ShapesSpec,
    ensure_shapes,
    generate_shapes,
    render_classification_image,
    render_classification_scene,
    render_scene,
)

SMALL = ShapesSpec(train_per_class=3, val_per_class=2, train_scenes=8, val_scenes=8, seed=7)
K = len(CLASSES)
ADE = "ade20k/ADEChallengeData2016"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "out", SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary dilation by a (2k+1) square, numpy only."""
    out = mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, k)
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= padded[k + dy : k + dy + h, k + dx : k + dx + w]
    return out


# --------------------------------------------------------------------------- spec


def test_fingerprint_is_stable_and_spec_sensitive() -> None:
    fp = SMALL.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert ShapesSpec(**SMALL.to_dict()).fingerprint() == fp
    assert ShapesSpec(**{**SMALL.to_dict(), "seed": 8}).fingerprint() != fp
    assert ShapesSpec(**{**SMALL.to_dict(), "image_size": 48}).fingerprint() != fp


def test_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        ShapesSpec(max_objects=0)
    with pytest.raises(ValueError):
        ShapesSpec(image_size=4)


# --------------------------------------------------------------------------- determinism


def test_generation_is_byte_identical(small_root: Path, tmp_path: Path) -> None:
    again = _files(generate_shapes(tmp_path / "again", SMALL))
    assert again == _files(small_root)


def test_different_seeds_differ(small_root: Path, tmp_path: Path) -> None:
    other = generate_shapes(tmp_path / "other", ShapesSpec(**{**SMALL.to_dict(), "seed": 8}))
    a, b = _files(small_root), _files(other)
    differing = [k for k in a if k.endswith((".png", ".jpg")) and a[k] != b.get(k)]
    assert len(differing) > 0.9 * sum(k.endswith((".png", ".jpg")) for k in a)


def test_rendering_is_independent_of_order() -> None:
    later = [render_scene(SMALL, "val", i).image for i in (5, 2)]
    first = render_scene(SMALL, "val", 2).image
    np.testing.assert_array_equal(first, later[1])
    img_a, label_a = render_classification_image(SMALL, "train", 9)
    render_classification_image(SMALL, "val", 9)
    img_b, label_b = render_classification_image(SMALL, "train", 9)
    assert label_a == label_b
    np.testing.assert_array_equal(img_a, img_b)
    assert not np.array_equal(img_a, render_classification_image(SMALL, "val", 9)[0])


# --------------------------------------------------------------------------- layout


def test_layout_and_counts_match_manifest(small_root: Path) -> None:
    m = json.loads((small_root / "manifest.json").read_text())
    assert m["spec"] == SMALL.to_dict() and m["classes"] == list(CLASSES)
    assert m["generator_version"] == GENERATOR_VERSION and m["fingerprint"] == SMALL.fingerprint()
    for split, per_class, n_scenes, ade_dir, prefix in (
        ("train", 3, 8, "training", "ADE_train"),
        ("val", 2, 8, "validation", "ADE_val"),
    ):
        pngs = sorted((small_root / "imagefolder" / split).glob("*/*.png"))
        assert len(pngs) == m["counts"]["imagefolder"][split] == per_class * K
        for name in CLASSES:
            assert len(list((small_root / "imagefolder" / split / name).glob("*.png"))) == per_class
        assert all(p.name.startswith(f"{split}_") and len(p.stem) == len(split) + 7 for p in pngs)
        with Image.open(pngs[0]) as im:
            assert im.size == (SMALL.image_size, SMALL.image_size) and im.mode == "RGB"
        coco = json.loads((small_root / f"coco/annotations/instances_{split}2017.json").read_text())
        assert len(coco["images"]) == m["counts"]["coco"][split]["images"] == n_scenes
        assert len(coco["annotations"]) == m["counts"]["coco"][split]["annotations"]
        jpgs = sorted((small_root / f"coco/{split}2017").glob("*.jpg"))
        assert [p.name for p in jpgs] == sorted(i["file_name"] for i in coco["images"])
        assert jpgs[0].name == "000000000000.jpg"
        imgs = sorted((small_root / ADE / "images" / ade_dir).glob("*.jpg"))
        anns = sorted((small_root / ADE / "annotations" / ade_dir).glob("*.png"))
        assert len(imgs) == len(anns) == m["counts"]["ade20k"][split]["images"] == n_scenes
        assert imgs[0].name == f"{prefix}_00000000.jpg" and anns[0].stem == imgs[0].stem
        for i in range(n_scenes):  # COCO and ADE20K hold the same scenes
            assert (small_root / f"coco/{split}2017/{i:012d}.jpg").read_bytes() == (
                small_root / ADE / "images" / ade_dir / f"{prefix}_{i:08d}.jpg"
            ).read_bytes()
    assert json.loads((small_root / ADE / "classes.json").read_text()) == list(CLASSES)


def test_every_class_appears(small_root: Path) -> None:
    coco = json.loads((small_root / "coco/annotations/instances_train2017.json").read_text())
    assert {c["id"] for c in coco["categories"]} == set(range(1, K + 1))
    assert {c["name"] for c in coco["categories"]} == set(CLASSES)
    assert {a["category_id"] for a in coco["annotations"]} == set(range(1, K + 1))
    labels = set()
    for p in (small_root / ADE / "annotations/training").glob("*.png"):
        labels |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert labels == set(range(K + 1))


def test_subset_of_formats_and_unknown_format(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "cls", SMALL, formats=("imagefolder",))
    assert (root / "imagefolder").is_dir() and not (root / "coco").exists()
    assert not (root / "ade20k").exists()
    with pytest.raises(ValueError, match="pascal"):
        generate_shapes(tmp_path / "bad", SMALL, formats=("pascal",))


# --------------------------------------------------------------------------- content


def test_classification_label_is_the_largest_object(small_root: Path) -> None:
    for split in ("train", "val"):
        for i in range(12):
            scene = render_classification_scene(SMALL, split, i)
            image, label = render_classification_image(SMALL, split, i)
            largest = max(scene.instances, key=lambda inst: inst.mask.sum())
            assert label == largest.class_id == i % K
            np.testing.assert_array_equal(image, scene.image)
            saved = small_root / f"imagefolder/{split}/{CLASSES[label]}/{split}_{i:06d}.png"
            if saved.exists():
                np.testing.assert_array_equal(np.asarray(Image.open(saved)), image)


def test_coco_annotations_agree_with_label_maps(small_root: Path) -> None:
    coco_mod = pytest.importorskip("pycocotools.coco")
    for split, ade_dir, prefix in (
        ("train", "training", "ADE_train"),
        ("val", "validation", "ADE_val"),
    ):
        coco = coco_mod.COCO(str(small_root / f"coco/annotations/instances_{split}2017.json"))
        assert coco.getAnnIds()
        for ann in coco.loadAnns(coco.getAnnIds()):
            info = coco.imgs[ann["image_id"]]
            index = int(Path(info["file_name"]).stem)
            labels = np.asarray(
                Image.open(small_root / ADE / "annotations" / ade_dir / f"{prefix}_{index:08d}.png")
            )
            assert labels.shape == (info["height"], info["width"]) and labels.dtype == np.uint8
            x, y, w, h = (int(v) for v in ann["bbox"])
            near = np.zeros(labels.shape, bool)
            near[max(0, y - 2) : y + h + 2, max(0, x - 2) : x + w + 2] = True
            mine = (labels == ann["category_id"]) & near  # this instance in the label map
            ys, xs = np.nonzero(mine)
            assert ann["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            assert ann["area"] == mine.sum() and ann["iscrowd"] == 0
            theirs = coco.annToMask(ann).astype(bool)
            iou = (theirs & mine).sum() / (theirs | mine).sum()
            assert iou >= 0.9, (split, ann["id"], iou)


def test_ring_rle_matches_pycocotools() -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for _ in range(50):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
        mine = shapes._rle_encode(m)
        assert mine["counts"] == ref["counts"].decode() and mine["size"] == list(ref["size"])


def test_label_maps_and_instance_masks_are_consistent() -> None:
    for i in range(8):
        scene = render_scene(SMALL, "train", i)
        labels = scene.label_map()
        assert labels.max() <= K and 1 <= len(scene.instances) <= SMALL.max_objects
        total = np.zeros(labels.shape, int)
        for inst in scene.instances:
            total += inst.mask
            assert (labels[inst.mask] == inst.class_id + 1).all()
        assert total.max() <= 1  # no overlap
        assert ((labels > 0) == (total > 0)).all()


def _contrast(scene: shapes.Scene) -> list[float]:
    """Per instance: mean |object color - surrounding background color| over channels."""
    img = scene.image.astype(float)
    occupied = np.zeros(img.shape[:2], bool)
    for inst in scene.instances:
        occupied |= _dilate(inst.mask, 1)
    out = []
    for inst in scene.instances:
        core = inst.mask & ~_dilate(~inst.mask, 1)
        ring = _dilate(inst.mask, 3) & ~occupied
        if core.sum() < 3 or ring.sum() < 3:
            continue
        out.append(float(np.abs(img[core].mean(0) - img[ring].mean(0)).mean()))
    return out


def test_objects_contrast_with_background() -> None:
    values = []
    for i in range(16):
        values += _contrast(render_scene(SMALL, "val", i))
        values += _contrast(render_classification_scene(SMALL, "train", i))
    assert len(values) >= 30
    assert min(values) > 40, sorted(values)[:5]


# --------------------------------------------------------------------------- caching and safety


def test_ensure_shapes_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_shapes(SMALL, tmp_path)
    assert root == tmp_path / f"shapes-{SMALL.fingerprint()}"
    assert json.loads((root / "manifest.json").read_text())["complete"] is True
    mtime = (root / "manifest.json").stat().st_mtime_ns

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(shapes, "_write_dataset", boom)
    assert ensure_shapes(SMALL, tmp_path) == root
    assert (root / "manifest.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp dirs left


def test_ensure_shapes_ignores_leftovers(tmp_path: Path) -> None:
    fp = SMALL.fingerprint()
    leftover = tmp_path / f".shapes-{fp}.tmp-killed"  # a run killed mid-way
    (leftover / "imagefolder").mkdir(parents=True)
    broken = tmp_path / f"shapes-{fp}"  # a final dir without a manifest is not done either
    (broken / "coco").mkdir(parents=True)
    root = ensure_shapes(SMALL, tmp_path)
    assert root == broken and json.loads((root / "manifest.json").read_text())["complete"]
    assert (root / "imagefolder/train").is_dir() and (root / "coco/annotations").is_dir()


def test_ensure_shapes_losing_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shapes._write_dataset
    final = tmp_path / f"shapes-{SMALL.fingerprint()}"

    def writer_racing_another_process(
        root: Path, spec: ShapesSpec, formats: tuple[str, ...]
    ) -> dict:
        winner = tmp_path / "winner"
        winner.mkdir()
        real(winner, spec, formats)
        (winner / "WINNER").touch()
        os.rename(winner, final)  # the other process finishes first
        return real(root, spec, formats)

    monkeypatch.setattr(shapes, "_write_dataset", writer_racing_another_process)
    assert ensure_shapes(SMALL, tmp_path) == final
    assert (final / "WINNER").exists()  # the winner's copy was kept intact
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our copy was discarded


def test_generate_refuses_a_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty") as err:
        generate_shapes(foreign, SMALL, formats=("imagefolder",))
    assert str(foreign) in str(err.value) and "delete" in str(err.value)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # nothing half-written beside it


def test_generate_into_empty_dir_and_over_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    generate_shapes(out, SMALL, formats=("imagefolder",))
    assert (out / "manifest.json").is_file()
    generate_shapes(out, SMALL, formats=("coco",))  # a previous shapes output is replaced
    assert (out / "coco").is_dir() and not (out / "imagefolder").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
