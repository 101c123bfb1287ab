"""Tests for the run record schema, the results store, atomic writes and provenance."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from harness.core import fsutil
from harness.core.fsutil import atomic_write_json, atomic_write_text, config_hash, sha256_file
from harness.core.provenance import collect_provenance, git_state
from harness.core.records import (
    EncoderInfo,
    ErrorInfo,
    MetricInfo,
    Record,
    RecordError,
    TaskInfo,
    load_record,
    load_records,
    new_run_id,
    record_json_schema,
    scan_records,
    utc_now,
    write_record,
)


def make_record(**overrides: Any) -> Record:
    """A valid ok record; keyword arguments replace fields."""
    fields: dict[str, Any] = {
        "run_id": new_run_id("enc-linear_probe-s0"),
        "status": "ok",
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:01:00+00:00",
        "duration_s": 60.0,
        "encoder": EncoderInfo(name="enc", arch="vit_tiny_patch16_224", source="random"),
        "task": TaskInfo(name="linear_probe", version=1),
        "metrics": {"top1": 12.5},
        "metric_info": {"top1": MetricInfo(higher_is_better=True, unit="%")},
        "config": {"lr": 0.1, "epochs": 2},
        "seed": 0,
    }
    fields.update(overrides)
    return Record(**fields)


# --------------------------------------------------------------------------- schema


def test_valid_record_fills_config_hash() -> None:
    record = make_record()
    assert record.config_hash == config_hash({"lr": 0.1, "epochs": 2})
    assert len(record.config_hash) == 16
    assert record.schema_version == 1


def test_ok_record_requires_metrics() -> None:
    with pytest.raises(ValueError, match="at least one metric"):
        make_record(metrics={}, metric_info={})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ok_record_rejects_non_finite_metrics(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        make_record(metrics={"top1": bad})


def test_metric_requires_metric_info() -> None:
    with pytest.raises(ValueError, match="metric_info"):
        make_record(metrics={"top1": 1.0, "top5": 2.0})


def test_ok_record_rejects_error() -> None:
    with pytest.raises(ValueError, match="must not have 'error'"):
        make_record(error=ErrorInfo(type="E", message="m"))


def test_failed_record_requires_error_and_allows_nan() -> None:
    with pytest.raises(ValueError, match="needs 'error'"):
        make_record(status="failed")
    record = make_record(
        status="failed", metrics={"top1": math.nan}, error=ErrorInfo(type="E", message="boom")
    )
    assert math.isnan(record.metrics["top1"])


def test_unknown_keys_and_bad_values_are_rejected() -> None:
    data = make_record().model_dump(mode="json")
    with pytest.raises(ValueError, match="extra"):
        Record.model_validate({**data, "surprise": 1})
    with pytest.raises(ValueError):
        Record.model_validate({**data, "run_id": "a/b"})
    with pytest.raises(ValueError, match="ISO-8601"):
        Record.model_validate({**data, "started_at": "yesterday"})
    with pytest.raises(ValueError, match="newer"):
        Record.model_validate({**data, "schema_version": 99})
    with pytest.raises(ValueError):
        Record.model_validate({**data, "encoder": {**data["encoder"], "source": "magic"}})


def test_error_info_from_exception() -> None:
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as exc:
        info = ErrorInfo.from_exception(exc)
    assert info.type == "RuntimeError"
    assert info.message == "out of memory"
    assert info.traceback is not None and "out of memory" in info.traceback


def test_new_run_id_is_readable_unique_and_safe() -> None:
    ids = {new_run_id("timm/vit_base.mae linear") for _ in range(200)}
    assert len(ids) == 200
    run_id = next(iter(ids))
    assert run_id.startswith("timm-vit_base.mae-linear-")
    assert "/" not in run_id and " " not in run_id
    make_record(run_id=run_id)  # accepted by the schema


def test_utc_now_parses() -> None:
    make_record(started_at=utc_now(), finished_at=utc_now())


def test_json_schema_documents_fields() -> None:
    schema = record_json_schema()
    assert {"run_id", "status", "metrics", "provenance"} <= set(schema["properties"])
    assert "higher_is_better" in json.dumps(schema)


# --------------------------------------------------------------------------- store


def test_write_and_load_roundtrip(tmp_path: Path) -> None:
    record = make_record(tags={"mask_ratio": "0.6"}, details={"best_head": "lr0.1"})
    path = write_record(record, tmp_path / "records")
    assert path.name == f"{record.run_id}.json"
    assert load_record(path) == record
    text = path.read_text()
    assert text.endswith("\n")
    assert json.loads(text)["run_id"] == record.run_id


def test_failed_record_with_nan_is_standard_json(tmp_path: Path) -> None:
    record = make_record(
        status="failed", metrics={"top1": math.nan}, error=ErrorInfo(type="E", message="m")
    )
    path = write_record(record, tmp_path)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert math.isnan(load_record(path).metrics["top1"])


def test_rewrite_same_run_id_replaces(tmp_path: Path) -> None:
    running = make_record(status="running", metrics={}, finished_at=None)
    write_record(running, tmp_path)
    done = running.model_copy(update={"status": "ok", "metrics": {"top1": 50.0}})
    write_record(Record.model_validate(done.model_dump()), tmp_path)
    (loaded,) = load_records(tmp_path)
    assert loaded.status == "ok" and loaded.metrics == {"top1": 50.0}


def test_load_record_names_file_on_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"run_id": "x", "schema_version": 1,')
    with pytest.raises(RecordError, match="broken.json"):
        load_record(path)


def test_load_records_skips_invalid_naming_each_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_record(make_record(), tmp_path / "a")
    bad = tmp_path / "b" / "bad.json"
    bad.parent.mkdir()
    data = json.loads(good.read_text())
    data["metrics"] = {}
    bad.write_text(json.dumps(data))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(good.read_text()[:-30])
    half = tmp_path / "half.json"  # cut before the run_id / schema_version keys (sorted keys)
    half.write_text(good.read_text()[: len(good.read_text()) // 2])
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / "list.json").write_text('["schema_version", "run_id"]')

    scan = scan_records(tmp_path)
    assert [r.run_id for r in scan.records] == [data["run_id"]]
    reasons = {item.path.name: item.reason for item in scan.skipped}
    assert set(reasons) == {"bad.json", "truncated.json", "half.json"}
    assert reasons["half.json"].startswith("not valid JSON")
    assert "an ok record needs at least one metric" in reasons["bad.json"]

    for _ in range(3):  # loaded three times, each file named once
        assert [r.run_id for r in load_records(tmp_path)] == [data["run_id"]]
    err = capsys.readouterr().err
    for name in ("bad.json", "truncated.json", "half.json"):
        assert err.count(name) == 1, err
    assert f"mimbench: warning: skipped record {half}: not valid JSON" in err
    assert "coco.json" not in err and "list.json" not in err

    with pytest.raises(RecordError, match="bad.json"):
        load_records(tmp_path, strict=True)


def test_write_record_stores_absolute_paths_config_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    record = make_record(
        encoder=EncoderInfo(name="p", arch="vit_micro_32", source="pretrain",
                            checkpoint="runs/s/pretrain/p/encoder.pth"),
        details={"stage": "runs/s/pretrain/p", "best_head": "lr0.1", "data_root": "/abs/data"},
        config={"encoder": {"checkpoint": "rel/encoder.pth"}, "data": {"source": "data"}},
    )
    hash_before = record.config_hash
    (loaded,) = load_records(write_record(record, tmp_path / "records").parent)
    assert loaded.encoder.checkpoint == str(tmp_path / "runs/s/pretrain/p/encoder.pth")
    assert loaded.details["stage"] == str(tmp_path / "runs/s/pretrain/p")
    assert loaded.details["data_root"] == "/abs/data" and loaded.details["best_head"] == "lr0.1"
    assert loaded.config == record.config and loaded.config_hash == hash_before
    # against the run's cwd from its provenance when it has one, not the writer's
    other = make_record(details={"stage": "st"}, provenance={"cwd": "/elsewhere"})
    (again,) = load_records(write_record(other, tmp_path / "r2").parent)
    assert again.details["stage"] == "/elsewhere/st"
    # timm weights are a name, not a path
    timm = make_record(encoder=EncoderInfo(name="t", arch="vit", source="checkpoint",
                                           checkpoint="timm:vit_tiny"))
    (kept,) = load_records(write_record(timm, tmp_path / "r3").parent)
    assert kept.encoder.checkpoint == "timm:vit_tiny"


def test_provenance_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert collect_provenance(["x"])["cwd"] == str(tmp_path.resolve())


def test_load_records_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope")


def _write_many(args: tuple[str, int, int]) -> list[str]:
    """Worker: writes ``count`` records into ``directory``; returns their run ids."""
    directory, worker, count = args
    run_ids = []
    for i in range(count):
        record = make_record(
            run_id=new_run_id(f"w{worker}-r{i}"),
            seed=i,
            metrics={"top1": float(worker * 100 + i)},
            config={"worker": worker, "i": i, "payload": "x" * 2000},
        )
        write_record(record, directory)
        run_ids.append(record.run_id)
    return run_ids


def test_concurrent_writers(tmp_path: Path) -> None:
    workers, per_worker = 8, 25
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_write_many, [(str(tmp_path), w, per_worker) for w in range(workers)])
    expected = {run_id for ids in results for run_id in ids}
    assert len(expected) == workers * per_worker
    loaded = load_records(tmp_path, strict=True)
    assert {r.run_id for r in loaded} == expected
    values = sorted(r.metrics["top1"] for r in loaded)
    assert values == sorted(float(w * 100 + i) for w in range(workers) for i in range(per_worker))
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".json")]


# --------------------------------------------------------------------------- fsutil


def test_atomic_write_json_format_and_no_temp_files(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "sub" / "x.json", {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = atomic_write_text(tmp_path / "x.txt", "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_failed_serialization_keeps_old_file(tmp_path: Path) -> None:
    path = atomic_write_json(tmp_path / "x.json", {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_torch_save(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = fsutil.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "ckpt.pth")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_sha256_and_config_hash(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == expected
    assert sha256_file(path, chunk=1) == expected
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert config_hash({"p": Path("/x")}) == config_hash({"p": "/x"})


# --------------------------------------------------------------------------- provenance


def test_collect_provenance_is_json_and_complete() -> None:
    prov = collect_provenance(["mimbench", "run", "suite.yaml"])
    json.dumps(prov)
    assert prov["command"] == ["mimbench", "run", "suite.yaml"]
    assert {"sha", "dirty"} <= set(prov["git"])
    assert prov["python"].count(".") == 2
    packages = prov["packages"]
    assert {"torch", "numpy", "pandas", "pydantic", "mmcv", "mmdet", "mmseg"} <= set(packages)
    assert packages["pydantic"] is not None
    assert prov["hardware"]["cpu_count"] >= 1


def test_provenance_does_not_import_openmmlab() -> None:
    import sys

    before = {m for m in ("mmcv", "mmdet", "mmseg") if m in sys.modules}
    collect_provenance([])
    after = {m for m in ("mmcv", "mmdet", "mmseg") if m in sys.modules}
    assert after == before


def test_git_state_outside_a_checkout(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"sha": None, "dirty": None}


def test_git_state_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    assert git_state() == {"sha": None, "dirty": None}
