"""The ``mimbench`` CLI's messages: every bad invocation ends in one ``mimbench: error:`` line
and exit status 2 (never a traceback), help texts list what the registries hold, each
command's ``--set`` example works for that command, and ``--version``."""

from __future__ import annotations

import argparse
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from harness.cli import SET_EXAMPLES, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SUITE = {
    "kind": "suite", "name": "mini", "seeds": [0],
    "data": {"source": "shapes", "shapes": {"train_per_class": 2, "val_per_class": 1}},
    "encoders": [{"name": "random-init", "encoder": {"arch": "vit_micro_32"}}],
    "tasks": [{"name": "linear_probe", "epochs": 1}],
}  # fmt: skip


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    """``mimbench COMMAND --help`` on one unwrapped line per option (COLUMNS is set wide)."""
    assert main([*command, "--help"]) == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps help at the terminal width
    monkeypatch.setenv("MIMBENCH_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- bad invocations


def _not_a_dataset(tmp_path: Path) -> str:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    return str(tmp_path / "full")


BAD = [  # (argv with {tmp} for the test's directory, a fragment of the one-line message)
    (["data", "synth", "--out", "{tmp}/d", "--image-size", "4"], "image_size must be an integer >= 8 (got 4)"),
    (["data", "synth", "--out", "{tmp}/d", "--train-per-class", "0"], "train_per_class must be an integer >= 1"),
    (["data", "synth", "--out", "{tmp}/d", "--seed", "-3"], "seed must be an integer >= 0"),
    (["data", "synth", "--out", "{full}", "--train-per-class", "1"], "is not empty and is not a shapes dataset"),
    (["data", "synth", "--out", "{tmp}/d", "--image-size", "four"], "--image-size: invalid int value: 'four'"),
    (["viz", "masks", "--out", "{tmp}/m.png", "--ratio", "1.5"], "mask ratio must lie strictly between 0 and 1"),
    (["viz", "masks", "--out", "{tmp}/m.png", "--ratio", "nan"], "mask ratio must lie strictly between 0 and 1"),
    (["viz", "masks", "--out", "{tmp}/m.png", "--arch", "vit_bse_16"], "did you mean 'vit_base_16'"),
    (["viz", "masks", "--out", "{tmp}/m.png", "--strategy", "shufle"], "did you mean 'shuffle'"),
    (["viz", "masks", "--out", "{tmp}/m.png", "--samples", "0"], "samples must be at least 1"),
    (["bench", "--arch", "vit_bse_16"], "did you mean 'vit_base_16'"),
    (["bench", "--batch", "0"], "--batch: must be at least 1 (got 0)"),
    (["bench", "pretrain/simmm"], "did you mean 'pretrain/simmim'"),
    (["export", "random:vit_micro_32", "--out", "{tmp}/e", "--img-size", "0"], "--img-size: must be at least 1"),
    (["export", "random:vit_micro_32", "--out", "{tmp}/e", "--arch", "vit_mcro_32"], "did you mean 'vit_micro_32'"),
    (["export", "random:vit_mcro_32", "--out", "{tmp}/e"], "did you mean 'vit_micro_32'"),
    (["export", "random:vit_micro_32", "--out", "{tmp}/e", "--formats", "onnx"], "onnx"),
    (["export", "random:vit_micro_32", "--out", "{tmp}/e", "--arch", "vit_tiny_32"], "--arch applies to checkpoint files"),
    (["import", "{tmp}/missing.pth", "--out", "{tmp}/i.pth"], "missing.pth"),
    (["eval", "linear", "--encoder", "random:vit_micro_32", "--seed", "-1"], "--seed: must be at least 0 (got -1)"),
    (["eval", "linear", "--encoder", "random:vit_micro_32", "--seed", "x"], "--seed: 'x' is not an integer"),
    (["eval", "linear", "--encoder", "random:vit_micro_32", "--arch", "vit_bse_16"], "did you mean 'vit_base_16'"),
    (["eval", "linear", "--encoder", "random:vit_micro_32", "--set", "epochs"], "must look like key.path=value"),
    (["eval", "linear"], "the following arguments are required: --encoder"),
    (["status", "{tmp}", "--watch", "-1"], "--watch: must be at least 0 seconds"),
    (["run", "{tmp}/nowhere.yaml"], "config file not found"),
    (["run", "{suite}", "--nproc-per-node", "0"], "--nproc-per-node: must be at least 1"),
    (["run", "{suite}", "--master-port", "70000"], "--master-port: must be at most 65535"),
    (["validate", "{suite}", "--set", "seeds"], "must look like key.path=value"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["data"], "the following arguments are required: COMMAND"),
    (["validate", "{suite}", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]  # fmt: skip


@pytest.mark.parametrize("argv,fragment", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_invocation_exits_2_with_one_line(argv, fragment, tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    subst = {"tmp": str(tmp_path), "suite": str(suite), "full": _not_a_dataset(tmp_path)}
    assert main([a.format(**subst) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mimbench: error: "), err
    assert fragment in lines[0]
    assert not (tmp_path / "d").exists() and not (tmp_path / "m.png").exists()


def test_export_of_a_random_preset_honours_img_size(tmp_path, capsys):
    """``--img-size`` was silently ignored for ``random:<preset>``: the file had the preset's
    32 px position embeddings."""
    import torch

    assert main(["export", "random:vit_micro_32", "--out", str(tmp_path / "e"), "--img-size", "64"]) == 0
    state = torch.load(tmp_path / "e.pth", weights_only=True)
    assert state["pos_embed"].shape == (1, (64 // 8) ** 2 + 1, 32)  # patch 8, width 32, + cls


def test_version_is_the_installed_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mimbench {version('mimbench')}"


# --------------------------------------------------------------------------- help from registries


def _commands() -> dict[str, argparse.ArgumentParser]:
    """The subcommands the parser dispatches to, from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_top_level_help_lists_every_command(capsys):
    text = _help(capsys)
    commands = _commands()
    assert len(commands) == 14
    listed = re.findall(r"^    (\S+)\s{2,}\S", text, flags=re.M)  # the commands section
    assert listed == list(commands)
    assert "`mimbench COMMAND --help`" in text


def test_eval_help_lists_every_task_alias_format_and_preset(capsys):
    from downstream.base import TASK_ALIASES, all_tasks
    from harness.core.config import ENCODER_PRESETS, checkpoint_format_names

    text = _help(capsys, "eval")
    tasks = sorted(all_tasks())
    assert {"detection", "segmentation", "linear_probe", "knn", "finetune"} <= set(tasks)
    assert f"a registered task: {', '.join(tasks)};" in text
    for alias, task in TASK_ALIASES.items():
        assert task in tasks and f"{alias} ({task})" in text
    formats = checkpoint_format_names()
    assert {"mimbench", "mimbench_ckpt", "timm", "mae", "beit", "simmim"} <= set(formats)
    assert f"auto (detect from the keys; default auto) or one of {', '.join(formats)}" in text
    assert ", ".join(ENCODER_PRESETS) in text


def test_eval_accepts_every_alias_and_task_name():
    from downstream.base import TASK_ALIASES, all_tasks, resolve_task_name

    tasks = all_tasks()
    assert all(resolve_task_name(t) == t for t in tasks)
    assert all(resolve_task_name(a) in tasks for a in TASK_ALIASES)


def test_other_help_texts_list_their_registries(capsys):
    from downstream.checkpoints import EXPORT_FORMATS
    from harness.bench import all_targets
    from harness.core.config import ENCODER_PRESETS, checkpoint_format_names, recipe_names
    from pretrain.masking import MASKERS

    presets = ", ".join(ENCODER_PRESETS)
    text = _help(capsys, "pretrain")
    assert f"Recipes ('recipe.name'): {', '.join(recipe_names())};" in text
    for cmd in ("export", "import"):
        text = _help(capsys, cmd)
        assert presets in text and ", ".join(checkpoint_format_names()) in text
    assert f"any of: {', '.join(EXPORT_FORMATS)}" in _help(capsys, "export")
    text = _help(capsys, "viz", "masks")
    assert presets in text and ", ".join(MASKERS.names()) in text
    text = _help(capsys, "bench")
    assert presets in text and ", ".join(all_targets()) in text


def test_report_help_names_every_file_report_writes(tmp_path, capsys):
    """Every output a report writes (the leaderboard incl. its HTML page, each sweep's
    ablation table) is named by ``report --help``."""
    from harness.ablation import write_ablation_reports
    from harness.report import write_report

    text = _help(capsys, "report")
    records = _sweep_records(tmp_path)
    leaderboard = write_report(records, tmp_path / "out")
    ablation = write_ablation_reports(records, tmp_path / "out", tmp_path / "none.yaml")
    assert "html" in leaderboard and ablation
    assert f"leaderboard.{{{','.join(leaderboard)}}}" in text
    kinds = {k for paths in ablation.values() for k in paths} | {"png"}
    assert f"ablation/<sweep>.{{{','.join(sorted(kinds, key=['md', 'csv', 'tex', 'png'].index))}}}" in text
    assert "HTML page" in text


def _sweep_records(tmp_path: Path) -> Path:
    """Records of a two-row, two-seed sweep, written by hand (no training)."""
    from harness.core.records import (
        EncoderInfo,
        MetricInfo,
        Record,
        SweepInfo,
        TaskInfo,
        write_record,
    )

    out = tmp_path / "records"
    for row, depth in enumerate((1, 2)):
        for seed in (0, 1):
            info = SweepInfo(name="dec", table="T", axes=["depth"], row=row, rows=2,
                             tags={"depth": depth})
            write_record(Record(
                run_id=f"r{row}s{seed}", status="ok", started_at="2025-01-01T00:00:00Z",
                encoder=EncoderInfo(name=f"enc@depth={depth}", arch="vit_micro_32", source="pretrain"),
                task=TaskInfo(name="linear_probe", version=1), metrics={"top1": 10.0 * row + seed},
                metric_info={"top1": MetricInfo(higher_is_better=True)}, seed=seed, sweep=info,
                tags={"depth": str(depth)},
            ), out)  # fmt: skip
    return out


# --------------------------------------------------------------------------- --set examples


def _examples(text: str) -> list[str]:
    found = re.findall(r"--set (?!KEY=VALUE)(\S+=\S+)", text)  # not the usage line's
    assert found, text
    return found


def _at(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("command", ["validate", "run", "plan", "status", "pretrain"])
def test_set_examples_in_help_work_for_their_command(command, tmp_path, capsys):
    """Each example of ``COMMAND --help`` applied to a file that command takes: the value
    lands where the example says (validate prints the resolved config), and run / plan /
    status accept it."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({**SUITE, "output_dir": str(tmp_path / "runs")}))
    pretrain = ROOT / "configs" / "pretrain" / "vit_mpp_tiny.yaml"
    examples = _examples(_help(capsys, command))
    assert examples == _examples(SET_EXAMPLES[command])
    for example in examples:
        key, value = example.split("=", 1)
        files = [pretrain] if command == "pretrain" else [suite]
        if command == "validate":  # a suite or a pretraining config: the example says which
            files = [pretrain] if key.split(".")[0] in ("train", "recipe") else [suite]
        for path in files:
            assert main(["validate", str(path), "--set", example]) == 0, capsys.readouterr().err
            assert _at(yaml.safe_load(capsys.readouterr().out), key) == yaml.safe_load(value)
            if command in ("plan", "status", "run"):
                assert main(["plan" if command == "run" else command, str(path), "--set", example]) == 0
                capsys.readouterr()


def test_eval_set_examples_apply_to_the_eval_suite(capsys):
    """eval's examples: a bare key is the task's option, a suite key keeps its place."""
    from harness.cli import eval_overrides
    from harness.core.config import apply_overrides, to_plain, validate_config

    examples = _examples(_help(capsys, "eval"))
    assert examples == _examples(SET_EXAMPLES["eval"])
    for example in examples:
        key, value = example.split("=", 1)
        raw = {**SUITE, "tasks": [{"name": "linear_probe"}]}
        cfg = to_plain(validate_config(apply_overrides(raw, eval_overrides([example]))))
        where = key if key.split(".")[0] in cfg else f"tasks.0.{key}"
        assert _at(cfg, where) == yaml.safe_load(value)
