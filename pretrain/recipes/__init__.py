"""The recipe files: one complete YAML file per recipe (``<name>.yaml``), every recipe and train
key explicit, each value citing the paper, table and section it comes from (or marked as the
harness's choice). Importing this package registers every file here in
:data:`harness.core.config.axes.RECIPES`, so a new recipe file needs no code.
"""

from __future__ import annotations

from pathlib import Path

from harness.core.config.axes import RECIPES

#: The directory of the recipe files (shipped as package data).
RECIPE_DIR = Path(__file__).resolve().parent

for _path in sorted(RECIPE_DIR.glob("*.yaml")):
    RECIPES.register(_path.stem, _path)
