"""The project's import graph, read from the source with :mod:`ast` (module-level AND
function-level imports), and the layering rules of DESIGN.md checked over it.

Layers, bottom up: ``harness.core`` (0) <- ``pretrain`` (1) <- ``downstream`` (2) <- the
orchestration modules of ``harness`` (3). A module may import its own layer and the layers below.
A project import inside a function is allowed only where it keeps OpenMMLab out of
``import downstream`` (the target is ``downstream._mm``) or in CLI dispatch (``harness.cli``).

Run ``python tests/structure.py [ROOT]`` to print the figures (imports, function-level imports,
cycles, violations, the longest functions and files); ``tests/test_layering.py`` fails on any
violation or cycle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("harness", "pretrain", "downstream")
LAZY_TARGETS = ("downstream._mm",)  # OpenMMLab glue: imported only when a dense task runs
LAZY_IMPORTERS = ("harness.cli",)  # CLI dispatch


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # the project module imported (resolved)
    line: int
    in_function: bool


def layer(module: str) -> int:
    """0 core, 1 pretrain, 2 downstream, 3 orchestration."""
    if module == "harness.core" or module.startswith("harness.core."):
        return 0
    top = module.split(".")[0]
    return {"pretrain": 1, "downstream": 2, "harness": 3}[top]


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file of every module of the project packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` (a dotted import path) names or lies in."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # ``from pkg import mod`` imports the submodule when there is one
                names = [f"{base}.{a.name}" for a in child.names] or [base]
                names = [n if _resolve(n, modules) == n else base for n in names]
            for name in names:
                target = _resolve(name, modules)
                if target and target != module:
                    found.append(Import(module, target, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def project_imports(root: Path) -> list[Import]:
    """Every project-internal import of the project packages under ``root``."""
    modules = module_files(root)
    out: dict[Import, None] = {}  # one entry per (importer, target, line): names of one statement
    for module, path in modules.items():
        out.update(dict.fromkeys(_imports_of(module, path, modules)))
    return list(out)


def violations(imports: list[Import]) -> list[str]:
    """Imports that break the layering or the function-level rule, one line each."""
    bad = []
    for imp in imports:
        if layer(imp.target) > layer(imp.importer):
            bad.append(f"{imp.importer}:{imp.line} imports {imp.target} (a layer above it)")
        if imp.in_function and not (
            imp.target.startswith(LAZY_TARGETS) or imp.importer in LAZY_IMPORTERS
        ):
            bad.append(
                f"{imp.importer}:{imp.line} imports {imp.target} inside a function (only "
                "downstream._mm and CLI dispatch may)"
            )
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def longest_functions(root: Path, n: int = 8) -> list[tuple[int, str]]:
    """The ``n`` longest functions / methods (lines, ``module:qualname``) of the packages."""
    found: list[tuple[int, str]] = []
    for module, path in module_files(root).items():
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        length = (child.end_lineno or child.lineno) - child.lineno + 1
                        found.append((length, f"{module}:{name}"))  # noqa: B023
                    visit(child, f"{name}.")

        visit(tree, "")
    return sorted(found, reverse=True)[:n]


def largest_files(root: Path, n: int = 8) -> list[tuple[int, str]]:
    """The ``n`` largest modules (lines, file)."""
    sizes = [
        (len(p.read_text().splitlines()), str(p.relative_to(root)))
        for p in module_files(root).values()
    ]
    return sorted(sizes, reverse=True)[:n]


def main(root: Path) -> None:
    imports = project_imports(root)
    lazy = [i for i in imports if i.in_function]
    print(f"project imports: {len(imports)}, inside functions: {len(lazy)} "
          f"({100 * len(lazy) / max(len(imports), 1):.0f} %)")
    found = cycles(imports)
    print(f"import cycles: {len(found)}")
    for comp in found:
        print(f"  {len(comp)} modules: {', '.join(comp)}")
    bad = violations(imports)
    print(f"layering violations: {len(bad)}")
    for line in bad:
        print(f"  {line}")
    print("longest functions: " + ", ".join(f"{name} {n}" for n, name in longest_functions(root)))
    print("largest files: " + ", ".join(f"{name} {n}" for n, name in largest_files(root)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
