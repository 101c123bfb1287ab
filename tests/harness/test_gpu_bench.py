"""The GPU benchmark script without a GPU: it refuses clearly, and its options and the commands
it would run are checked (the measurements themselves need a CUDA device)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import gpu_bench

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_refuses_with_no_gpu(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_bench: no GPU: torch.cuda.is_available() is False")
    assert not (tmp_path / "o").exists()  # nothing written


def test_the_shell_script_refuses_too_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be seen here")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin",
                                          "PYTHON": str(Path(__import__("sys").executable))})
    assert proc.returncode == 2 and "no GPU:" in proc.stderr


def test_the_commands_cover_both_sizes_compile_and_data(tmp_path):
    args = gpu_bench.build_parser().parse_args(["--batch-base", "16", "--steps", "3"])
    runs = gpu_bench.plan_runs(args, tmp_path)
    names = [r.name for r in runs]
    assert names == ["vit_base_16-eager", "vit_base_16-compile", "vit_large_16-eager",
                     "vit_large_16-compile", "fsdp", "data"]
    by = {r.name: " ".join(r.argv) for r in runs}
    assert by["vit_base_16-eager"].startswith("bench pretrain/mae pretrain/simmim task/finetune "
                                              "--arch vit_base_16 --batch 16 --steps 3")
    assert "--device cuda" in by["vit_large_16-eager"] and "--batch 32" in by["vit_large_16-eager"]
    assert "pretrain/mae+compile" in by["vit_large_16-compile"]
    assert "+compile" not in by["vit_large_16-eager"]
    assert by["data"] == f"bench data --csv {tmp_path / 'data.csv'}"
    assert by["fsdp"] == ("bench pretrain/mae+fsdp pretrain/mae --arch vit_large_16 --batch 32 "
                          "--steps 3 --device cuda --compare pretrain/mae+fsdp pretrain/mae "
                          f"--csv {tmp_path / 'fsdp.csv'}")  # fmt: skip
    from harness.bench import check_targets
    from harness.cli import build_parser as cli_parser

    check_targets(list(runs[4].argv[1:3]))  # the targets exist
    parsed = cli_parser().parse_args(list(runs[4].argv))  # mimbench's own options take them
    assert parsed.compare == [["pretrain/mae+fsdp", "pretrain/mae"]]
    assert all(f"--csv {tmp_path / (r.name + '.csv')}" in by[r.name] for r in runs)
    skipped = gpu_bench.plan_runs(
        gpu_bench.build_parser().parse_args(["--skip", "compile", "--skip", "data", "--skip",
                                             "fsdp"]), tmp_path)  # fmt: skip
    assert [r.part for r in skipped] == ["eager", "eager"]


def test_bad_options_are_usage_errors(capsys):
    for argv in (["--steps", "0"], ["--batch-large", "x"], ["--skip", "warp"]):
        with pytest.raises(SystemExit) as exc:
            gpu_bench.build_parser().parse_args(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1 (got 0)" in err and "'x' is not an integer" in err
    assert "invalid choice: 'warp'" in err


def test_dry_run_prints_the_commands_without_a_gpu(capsys):
    assert gpu_bench.main(["--dry-run", "--out", "X"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("mimbench bench ") for line in lines)


def test_summary_reads_the_csvs(tmp_path):
    (tmp_path / "a.csv").write_text(
        "target,arch,img,batch,step_s,img_per_s,peak_mb,gflops_per_img,mfu,device,error\n"
        "pretrain/mae,vit_base_16,224,64,0.1,640,1,1,0.4123,H100,\n"
        "task/finetune,vit_base_16,224,64,,,,,,H100,oom\n")
    runs = [gpu_bench.BenchRun("a", "eager", ()), gpu_bench.BenchRun("b", "data", ())]
    text = gpu_bench.summary(tmp_path, runs, {"a": 1, "b": 0})
    assert "640.0" in text and "41.2%" in text and "failed: oom" in text
    assert text.splitlines()[-1] == "failed: a (exit 1)"


def test_every_planned_bench_command_is_one_the_cli_accepts(tmp_path):
    from harness.cli import build_parser

    args = gpu_bench.build_parser().parse_args([])
    for run in gpu_bench.plan_runs(args, tmp_path):
        if run.part == "data":  # `bench data` is dispatched before the main parser
            continue
        ns = build_parser().parse_args(list(run.argv))
        assert ns.csv == str(tmp_path / f"{run.name}.csv")
