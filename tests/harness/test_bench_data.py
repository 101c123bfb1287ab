"""``mimbench bench data`` runs on a tiny set and prints its three rows and its stage profile (no
timing assertions)."""

from __future__ import annotations

from harness.cli import main


def test_bench_data_prints_the_three_rows(tmp_path, capsys):
    argv = ["bench", "data", "--images", "8", "--width", "64", "--height", "48", "--img-size",
            "16", "--batch", "2", "--workers", "0", "--repeat", "1", "--dir", str(tmp_path),
            "--stages"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line.endswith("x |")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["baseline", "fast/imagefolder", "fast/shards"]
    assert rows[0].endswith("| 1.00x | 1.00x |")  # best-rate ratio, median of the rounds' ratios
    stages = [line for line in out.splitlines() if line.startswith("| ") and line.endswith(" |")]
    names = [line.split(" | ")[0][2:] for line in stages]
    assert "torchvision decode_jpeg (uint8 tensor)" in names
    assert "whole fast transform (decode to uint8)" in names
    assert "libjpeg-turbo partial decode of the box (jpegcrop)" in names
    assert "whole fast transform, whole-image decode" in names
    assert "JPEG crop decode on: libjpeg-turbo" in out or "JPEG crop decode off: " in out
    assert (tmp_path / "shards" / "manifest.json").is_file()  # --dir keeps what it wrote
    assert "load average" in out


def test_bench_data_help_and_bad_options(capsys):
    assert main(["bench", "data", "--help"]) == 0
    assert "--img-size" in capsys.readouterr().out
    assert main(["bench", "data", "--images", "2"]) == 2
