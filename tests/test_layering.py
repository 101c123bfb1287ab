"""The layering of DESIGN.md holds over the whole import graph, function-level imports included
(the graph is read by :mod:`structure` from the source, nothing is imported)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import structure

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_goes_up_a_layer_or_hides_in_a_function():
    bad = structure.violations(structure.project_imports(ROOT))
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = structure.cycles(structure.project_imports(ROOT))
    assert not found, "import cycles:\n" + "\n".join(", ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_check_sees_upward_function_level_and_circular_imports(tmp_path):
    """The checker itself can fail: a tree with one of each fault is reported exactly."""
    _write(tmp_path, {
        "harness/__init__.py": "",
        "harness/core/__init__.py": "",
        "harness/core/config.py": "def f():\n    from pretrain import model\n",
        "harness/cli.py": "def main():\n    from downstream import task\n",
        "pretrain/__init__.py": "",
        "pretrain/model.py": "from harness.core import config\nfrom . import heads\n",
        "pretrain/heads.py": "from pretrain.model import x\n",
        "downstream/__init__.py": "",
        "downstream/task.py": "from harness import cli\n\ndef run():\n    from downstream._mm import glue\n",
        "downstream/_mm/__init__.py": "",
        "downstream/_mm/glue.py": "",
    })
    imports = structure.project_imports(tmp_path)
    bad = structure.violations(imports)
    assert any(b.startswith("harness.core.config:2 imports pretrain.model (a layer above") for b in bad)
    assert any(b.startswith("harness.core.config:2 imports pretrain.model inside a function") for b in bad)
    assert any(b.startswith("downstream.task:1 imports harness.cli (a layer above") for b in bad)
    assert len(bad) == 3  # the CLI's dispatch import and the lazy _mm import are allowed
    assert structure.cycles(imports) == [
        ["downstream.task", "harness.cli"],
        ["harness.core.config", "pretrain.heads", "pretrain.model"],
    ]
