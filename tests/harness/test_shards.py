"""Shard datasets: writing (manifest, atomicity), random access equal to the ImageFolder, the
stream's order (ranks, workers, exact resume), and damaged input skipped and counted or fatal."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from harness.core.config import DataConfig
from harness.core.data import shards
from harness.core.data.datasets import (
    CheckedImageFolder,
    DatasetError,
    imagefolder_checked,
    imagefolder_classes,
    resolve_imagefolder_root,
)
from harness.core.data.shards import (
    ShardImageFolder,
    ShardResumeError,
    ShardStream,
    StreamTally,
    collate_stream,
    read_manifest,
    write_shards,
)

CLASSES = ("cat", "dog", "emu")


def make_imagefolder(root: Path, train: int = 4, val: int = 2, size: tuple[int, int] = (20, 14)) -> Path:
    """A tiny ImageFolder of random JPEGs (one PNG per class) with dotted file names."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                ext = "png" if i == 0 else "jpg"
                Image.fromarray(arr).save(d / f"{c}.{i}.{ext}")
    return root


def members(out: Path, split: str, entry: dict) -> list:
    """A shard's members as its index lists them."""
    return shards.shard_members(out / split, entry)


def rewrite_index(out: Path, split: str, shard: int, edit) -> dict:
    """Edit one shard's index (``edit(members)``) and record its new sha256 in the manifest, as
    a writer that got the index wrong would; returns the shard's manifest entry."""
    man = read_manifest(out)
    entry = man["splits"][split]["shards"][shard]
    path = out / split / entry["index"]
    index = json.loads(path.read_text())
    edit(index["members"])
    raw = json.dumps(index).encode()
    path.write_bytes(raw)
    entry["index_sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "manifest.json").write_text(json.dumps(man))
    return entry


@pytest.fixture()
def data(tmp_path):
    src = make_imagefolder(tmp_path / "if")
    out = tmp_path / "shards"
    write_shards(src, out, shard_size=2, log=lambda m: None)
    return src, out


def test_manifest_and_tar_layout(data):
    src, out = data
    man = read_manifest(out)
    assert man["classes"] == list(CLASSES)
    train = man["splits"]["train"]
    assert train["samples"] == 12 and len(train["shards"]) == 6  # ceil(12 / 2)
    assert man["splits"]["val"]["samples"] == 6
    assert man["version"] == 2 and "members" not in json.dumps(man)  # members in the indexes
    seen = set()
    for entry in train["shards"]:
        path = out / "train" / entry["name"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
        index = out / "train" / entry["index"]
        assert index.name == entry["name"].replace(".tar", ".idx.json")
        assert entry["index_sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
        with tarfile.open(path) as tar:
            names = tar.getnames()
            # WebDataset's grouping: KEY.ext then KEY.cls, consecutive
            assert len(names) == 2 * entry["samples"]
            for key, ext, label, off, size in members(out, "train", entry):
                i = names.index(f"{key}.{ext}")
                assert names[i + 1] == f"{key}.cls"
                assert tar.extractfile(f"{key}.cls").read() == str(label).encode()
                cls, stem = key.split("/")
                assert "." not in stem and CLASSES[label] == cls
                original = src / "train" / cls / f"{stem.replace('_', '.')}.{ext}"
                assert tar.extractfile(f"{key}.{ext}").read() == original.read_bytes()
                assert path.read_bytes()[off : off + size] == original.read_bytes()
                seen.add(key)
    assert len(seen) == 12


def test_interrupted_write_leaves_no_complete_looking_shard_and_no_manifest(tmp_path, monkeypatch):
    src = make_imagefolder(tmp_path / "if")
    calls = {"n": 0}
    real = shards._tar_add

    def dies_in_third_shard(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 9:  # the first member of the third shard (4 members per shard)
            raise KeyboardInterrupt
        return real(tar, name, data)

    monkeypatch.setattr(shards, "_tar_add", dies_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, tmp_path / "out", shard_size=2, log=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert files == ["train-000000.idx.json", "train-000000.tar", "train-000001.idx.json",
                     "train-000001.tar"]  # complete ones only, no temp  # fmt: skip
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        read_manifest(tmp_path / "out")


def test_random_access_equals_the_imagefolder(data):
    src, out = data
    for split in ("train", "val"):
        a = CheckedImageFolder(str(src / split))
        b = imagefolder_checked(out, split, None)
        assert isinstance(b, ShardImageFolder)
        assert b.classes == a.classes and b.targets == a.targets and len(a) == len(b)
        for i in range(len(a)):
            ia, ya = a[i]
            ib, yb = b[i]
            assert ya == yb
            assert np.array_equal(np.asarray(ia), np.asarray(ib))  # the same file, decoded


def test_data_config_detects_or_insists_on_the_layout(data):
    src, out = data
    assert resolve_imagefolder_root(DataConfig(source=str(out))) == out
    assert imagefolder_classes(out, "val") == list(CLASSES)
    with pytest.raises(DatasetError, match="data.layout is 'imagefolder' but .* holds shards"):
        resolve_imagefolder_root(DataConfig(source=str(out), layout="imagefolder"))
    with pytest.raises(DatasetError, match="data.layout is 'shards' but .* holds imagefolder"):
        resolve_imagefolder_root(DataConfig(source=str(src), layout="shards"))
    # the new keys stay out of dumps (and config hashes) at their defaults
    assert set(DataConfig().model_dump()) == {"source", "shapes", "num_workers", "eval_crop_pct"}
    assert DataConfig(layout="shards", fast_decode=True).model_dump()["layout"] == "shards"


def _damage_member(out: Path, split: str, shard: int, member: int) -> str:
    """Overwrite one image member's bytes with junk of the same size; returns its name."""
    entry = read_manifest(out)["splits"][split]["shards"][shard]
    key, ext, _, off, size = members(out, split, entry)[member]
    path = out / split / entry["name"]
    raw = bytearray(path.read_bytes())
    raw[off : off + size] = b"\0" * size
    path.write_bytes(bytes(raw))
    return f"{entry['name']}/{key}.{ext}"


def test_random_access_skips_or_fails_on_damage(data):
    _, out = data
    bad = _damage_member(out, "val", 0, 1)  # same size: a member that does not decode
    # the index no longer matches the shard
    renamed = rewrite_index(out, "val", 1, lambda ms: ms[0].__setitem__(0, "cat/renamed"))
    ext = members(out, "val", renamed)[0][1]
    ds = imagefolder_checked(out, "val", None)
    names = [Path(p).relative_to(ds.root).as_posix() for p, _ in ds.samples]
    unreadable = {names[i] for i in range(len(ds)) if ds[i] is None}
    assert unreadable == {bad, f"{renamed['name']}/cat/renamed.{ext}"}
    strict = imagefolder_checked(out, "val", None, strict=True)
    i = names.index(bad)
    with pytest.raises(DatasetError, match=f"unreadable image .*{bad}"):
        strict[i]


def test_a_truncated_shard_is_named_and_its_samples_skipped(data):
    _, out = data
    entry = read_manifest(out)["splits"]["train"]["shards"][2]
    path = out / "train" / entry["name"]
    path.write_bytes(path.read_bytes()[:700])
    ds = imagefolder_checked(out, "train", None)
    lost = [p for i, (p, _) in enumerate(ds.samples) if ds[i] is None]
    assert len(lost) == entry["samples"] and all(entry["name"] in p for p in lost)
    with pytest.raises(DatasetError, match=f"shard .*{entry['name']} has 700 bytes"):
        imagefolder_checked(out, "train", None, strict=True)


# --------------------------------------------------------------------------- stream


def _to_tensor(img):
    return torch.from_numpy(np.array(img.convert("RGB").resize((8, 8)))).permute(2, 0, 1)


def _keys(stream: ShardStream, workers: int, start: int = 0, epoch: int = 0) -> list[str]:
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers,
                        collate_fn=collate_stream)  # fmt: skip
    return [k for batch in loader for k in batch[3]]


def _stream(out, **kw) -> ShardStream:
    args = {"split": "train", "transform": _to_tensor, "seed": 3, "batch_size": 2, "buffer": 3}
    return ShardStream(out, **{**args, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_mid_epoch_gives_the_uninterrupted_order(data, workers):
    _, out = data
    stream = _stream(out, num_workers=workers)
    full = _keys(stream, workers)
    n = stream.batches_per_epoch()
    assert len(full) == n * 2 and len(set(full)) == len(full)
    for b in range(n + 1):
        resumed = _stream(out, num_workers=workers)
        resumed.load_state_dict(stream.state_dict(0, b))
        assert _keys(resumed, workers, b) == full[b * 2 :]


def test_stream_order_is_seeded_per_epoch_and_split_over_ranks(data):
    _, out = data
    a, b = _keys(_stream(out), 0), _keys(_stream(out), 0)
    assert a == b and a != _keys(_stream(out), 0, epoch=1) and a != _keys(_stream(out, seed=4), 0)
    ranks = [_keys(_stream(out, rank=r, world=2), 0) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    shard_of = {f"{k}": e["name"] for e in read_manifest(out)["splits"]["train"]["shards"]
                for k in (f"{e['name']}/{m[0]}.{m[1]}" for m in members(out, "train", e))}  # fmt: skip
    assert not {shard_of[k] for k in ranks[0]} & {shard_of[k] for k in ranks[1]}
    # unshuffled, a slot streams its shards in order: the buffer is what mixes them
    plain = _keys(_stream(out, buffer=0), 0)
    s = _stream(out, buffer=0)
    want = [f"{s.entries[i]['name']}/{m[0]}.{m[1]}" for i in s.slot_shards(0, 0, 0)
            for m in members(out, "train", s.entries[i])][: s.slot_samples()]  # fmt: skip
    assert plain == want and sorted(plain) == sorted(a)


def test_stream_refuses_to_resume_with_other_workers_or_ranks(data):
    _, out = data
    state = _stream(out, num_workers=2).state_dict(0, 3)
    with pytest.raises(ShardResumeError, match="workers 2 -> 1.*resume with 1 rank"):
        _stream(out).load_state_dict(state)
    with pytest.raises(ShardResumeError, match="world 1 -> 2"):
        _stream(out, num_workers=2, world=2).load_state_dict(state)
    with pytest.raises(DatasetError, match="fewer than ranks x loader workers"):
        _stream(out, num_workers=4, world=2)


def _tallied(stream: ShardStream) -> tuple[StreamTally, list[str]]:
    """One epoch of ``stream`` from its start: its unreadable samples tallied, every name."""
    stream.set_position(0)
    tally, keys = StreamTally("train"), []
    for imgs, _, kept, names, why in DataLoader(stream, batch_size=2, collate_fn=collate_stream):
        tally.add(why)
        keys += names
        assert imgs.shape[0] == int(kept.sum())
    return tally, keys


def test_stream_counts_damaged_samples_and_keeps_its_length(data):
    _, out = data
    full = _keys(_stream(out), 0)
    bad = _damage_member(out, "train", 0, 0)
    entry = read_manifest(out)["splits"]["train"]["shards"][3]
    path = out / "train" / entry["name"]
    path.write_bytes(path.read_bytes()[:-1024])  # truncated: its size no longer matches
    tally, keys = _tallied(_stream(out))
    assert keys == full  # the same order, damaged samples in their places
    # shard 0 no longer matches its sha256: none of its samples is trusted
    lost = {k for k in full if k.startswith((bad.split("/")[0], entry["name"]))}
    assert set(tally.skipped) == lost
    assert "does not match the manifest's sha256" in tally.skipped[bad]
    assert "has " in tally.skipped[next(k for k in lost if k.startswith(entry["name"]))]
    lines = []
    tally.report(lines.append)
    assert f"skipped {len(lost)} unreadable sample(s)" in lines[0]
    with pytest.raises(DatasetError, match="unreadable sample .*train-00000"):
        list(_stream(out, strict=True))


def test_webdataset_grouping_of_the_members(data):
    """Read a shard the way WebDataset does (members grouped by the name before the first dot
    of the base name) and get back each sample's image and label."""
    _, out = data
    entry = read_manifest(out)["splits"]["train"]["shards"][0]
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(out / "train" / entry["name"]) as tar:
        for m in tar:
            prefix, base = m.name.rsplit("/", 1)
            key, ext = base.split(".", 1)
            groups.setdefault(f"{prefix}/{key}", {})[ext] = tar.extractfile(m).read()
    for key, ext, label, _, _ in members(out, "train", entry):
        assert int(groups[key]["cls"]) == label
        Image.open(io.BytesIO(groups[key][ext])).load()


def test_cli_data_shard_writes_a_dataset_the_tasks_read(tmp_path, capsys):
    from harness.cli import main

    src = make_imagefolder(tmp_path / "if", train=2, val=2)
    assert main(["data", "shard", str(src), "--out", str(tmp_path / "s"), "--shard-size", "4"]) == 0
    assert "manifest.json" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "s")["splits"]["train"]["shards"]) == 2  # ceil(6 / 4)
    assert main(["data", "shard", str(src / "train"), "--out", str(tmp_path / "t")]) == 2
    assert "train/train is missing" in capsys.readouterr().err


def test_pretraining_reads_shards_as_it_reads_the_imagefolder(tiny_imagefolder, tmp_path):
    """The same run on the ImageFolder and on its shards: the same batches, so the same losses."""
    from harness.core.config import PretrainConfig
    from pretrain.engine import pretrain

    write_shards(tiny_imagefolder, tmp_path / "s", shard_size=5, log=lambda m: None)

    def run(source: Path, out: str) -> list[float]:
        cfg = PretrainConfig(
            data={"source": str(source)}, encoder={"arch": "vit_micro_32"},
            recipe={"name": "simmim", "masking": {"mask_patch_size": 16}},
            train={"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "base_lr": 1e-3,
                   "lr_base_batch": 8, "num_recon_images": 2},
        )  # fmt: skip
        pretrain(cfg, tmp_path / out, log=lambda m: None)
        lines = (tmp_path / out / "loss.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines]

    a, b = run(tiny_imagefolder, "a"), run(tmp_path / "s", "b")
    assert len(a) == 3 and a == b


@pytest.mark.slow
def test_tasks_read_shards_as_they_read_the_imagefolder(tiny_imagefolder, tmp_path):
    """kNN (on the features the probes cache too) on an ImageFolder and on its shards: the
    same metrics; a damaged member is skipped and named by shard and member in the pretraining
    summary."""
    from downstream.base import TaskContext, get_task
    from downstream.knn import KNNConfig
    from harness.core.config import EncoderConfig
    from pretrain.encoders.vit import ViTEncoder

    write_shards(tiny_imagefolder, tmp_path / "s", shard_size=7, log=lambda m: None)
    torch.manual_seed(0)
    enc = ViTEncoder(EncoderConfig(arch="vit_micro_32"))

    def metrics(source: Path, name: str) -> dict[str, float]:
        ctx = TaskContext(data=DataConfig(source=str(source)), seed=0,
                          device=torch.device("cpu"), out_dir=tmp_path / name, log=lambda m: None)
        return get_task("knn").run(enc, KNNConfig(k=3), ctx).metrics  # fmt: skip

    a, b = metrics(tiny_imagefolder, "a"), metrics(tmp_path / "s", "b")
    assert a == b and a["top1"] > 0

    from harness.core.config import PretrainConfig
    from pretrain.engine import pretrain

    bad = _damage_member(tmp_path / "s", "train", 1, 2)
    cfg = PretrainConfig(
        data={"source": str(tmp_path / "s")}, encoder={"arch": "vit_micro_32"},
        recipe={"name": "simmim", "masking": {"mask_patch_size": 16}},
        train={"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "base_lr": 1e-3,
               "lr_base_batch": 8, "num_recon_images": 0},
    )  # fmt: skip
    pretrain(cfg, tmp_path / "p", log=lambda m: None)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["skipped_files"] == [bad] and summary["skipped_images"] == {"train": 1}


def test_stream_epoch_length_is_the_fewest_samples_a_slot_can_get(tmp_path):
    """Shards of 5, 5 and 2 samples over 2 worker slots (2 shards and 1 shard): brute force
    over every shard order, the slot of one shard can get 2 samples, so every epoch yields 2
    samples per slot, and each epoch's slots hold at least that."""
    import itertools

    src = make_imagefolder(tmp_path / "if")  # 12 train images
    write_shards(src, tmp_path / "s", shard_size=5, log=lambda m: None)
    stream = _stream(tmp_path / "s", num_workers=2)
    sizes = [e["samples"] for e in stream.entries]
    assert sorted(sizes) == [2, 5, 5]
    fewest = min(min(sum(sizes[s] for s in p[w::2]) for w in range(2))
                 for p in itertools.permutations(range(3)))  # fmt: skip
    assert stream.slot_samples() == fewest == 2 and stream.batches_per_epoch() == 2
    for epoch in range(6):
        assert len(_keys(stream, 2, epoch=epoch)) == 4
        assert all(sum(sizes[s] for s in stream.slot_shards(epoch, 0, w)) >= 2 for w in range(2))
    wide = _stream(tmp_path / "s", batch_size=1)  # one slot: all 12 samples, in every epoch
    assert wide.slot_samples() == 12 and len(_keys(wide, 0, epoch=3)) == 12


def test_the_synthetic_datasets_manifest_is_not_a_shard_manifest(tmp_path):
    """``mimbench data synth`` writes its own manifest.json (naming its generator): that root
    is read as the ImageFolder it holds, not refused as a broken shard dataset; an unreadable
    manifest still counts as a shard manifest, so reading it names the problem."""
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "manifest.json").write_text(json.dumps({"generator": "shapes"}))
    assert not shards.is_shard_root(tmp_path / "synth")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert shards.is_shard_root(tmp_path / "bad")
    with pytest.raises(shards.DatasetError, match="not valid JSON"):
        shards.read_manifest(tmp_path / "bad")
    assert not shards.is_shard_root(tmp_path)  # no manifest at all


def test_a_missing_or_damaged_index(data):
    """The stream yields the shard's samples as unreadable items (its count from the manifest,
    so every slot keeps its length) naming the index; the random access reader cannot list the
    shard's samples and stops, naming the index and the fix."""
    _, out = data
    full = _keys(_stream(out), 0)
    man = read_manifest(out)
    gone = man["splits"]["train"]["shards"][1]
    (out / "train" / gone["index"]).unlink()
    damaged = man["splits"]["train"]["shards"][4]
    path = out / "train" / damaged["index"]
    path.write_text(path.read_text().replace('"members"', '"membres"'))
    tally, keys = _tallied(_stream(out))
    assert len(keys) == len(full)
    lost = {k for k in full if k.startswith((gone["name"], damaged["name"]))}
    assert len(tally.skipped) == len(lost)
    assert {k.split("/")[0] for k in tally.skipped} == {gone["name"], damaged["name"]}
    whys = set(tally.skipped.values())
    assert any(gone["index"] in w and "No such file" in w for w in whys)
    assert any(damaged["index"] in w and "sha256" in w for w in whys)
    with pytest.raises(DatasetError, match=f"cannot list the samples of shard .*{gone['name']}.*mimbench data shard"):
        imagefolder_checked(out, "train", None)
    with pytest.raises(DatasetError, match="unreadable sample"):
        list(_stream(out, strict=True))


def test_an_index_that_lists_other_members_than_the_manifest_counts(data):
    _, out = data
    entry = rewrite_index(out, "train", 0, lambda ms: ms.pop())
    with pytest.raises(OSError, match=f"{entry['index']} lists 1 members, the manifest 2"):
        members(out, "train", entry)


def test_a_version_1_manifest_with_the_members_inline_is_still_read(data):
    """Datasets written before the per-shard indexes: the same samples, order and batches."""
    src, out = data
    want_keys = _keys(_stream(out), 0)
    want = imagefolder_checked(out, "train", None)
    man = read_manifest(out)
    for split in ("train", "val"):
        for e in man["splits"][split]["shards"]:
            e["members"] = members(out, split, e)
            (out / split / e.pop("index")).unlink()
            e.pop("index_sha256")
    man["version"] = 1
    (out / "manifest.json").write_text(json.dumps(man))
    got = imagefolder_checked(out, "train", None)
    assert got.samples == want.samples
    assert np.array_equal(np.asarray(got[3][0]), np.asarray(want[3][0]))
    assert _keys(_stream(out), 0) == want_keys
    man["version"] = 3
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DatasetError, match=r"version \(1, 2\)"):
        read_manifest(out)


@pytest.mark.slow
def test_the_manifest_scale_benchmark_runs_and_shows_the_two_versions():
    """``scripts/manifest_scale.py`` on a small split (no timing asserted): both rows, and the
    version 2 manifest.json much smaller than version 1's (the members moved to the indexes)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "scripts" / "manifest_scale.py"), "--images",
                          "3000", "--shard-size", "500"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines()
            if line.startswith("| version")}  # fmt: skip
    assert set(rows) == {"version 1", "version 2"}
    v1_mb, v2_mb = float(rows["version 1"][1]), float(rows["version 2"][1])
    assert v2_mb * 20 < v1_mb and float(rows["version 2"][2]) > 0  # index files written
