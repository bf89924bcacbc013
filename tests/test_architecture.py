"""The layers of pyproject.toml's [tool.importlinter] hold: no import runs up a layer, no cycles.

`python -m tests.test_architecture` prints the figures docs/architecture.md quotes.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="import-linter (the `test` extra) is not installed")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("simulator", "calibration", "profiler")


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def layers() -> list[list[str]]:
    """The layers, top first, each as its module names."""
    (contract,) = [c for c in contracts() if c["type"] == "layers"]
    return [[m.strip() for m in layer.replace("|", ":").split(":") if m.strip()]
            for layer in contract["layers"]]


def graph():
    sys.path.insert(0, str(REPO))
    try:
        return grimp.build_graph(*PACKAGES, cache_dir=None, exclude_type_checking_imports=True)
    finally:
        sys.path.remove(str(REPO))


def cycles(g) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(g.modules):
        if module not in index:
            visit(module)
    return found


def layer_of(module: str, table: list[list[str]]) -> int | None:
    for i, layer in enumerate(table):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def upward_imports(g, table: list[list[str]]) -> list[tuple[str, str]]:
    """Direct imports from a module to one in a higher layer (a smaller index)."""
    out = []
    for importer in sorted(g.modules):
        a = layer_of(importer, table)
        for imported in sorted(g.find_modules_directly_imported_by(importer)):
            b = layer_of(imported, table)
            if a is not None and b is not None and b < a:
                out.append((importer, imported))
    return out


def test_import_linter_contracts_are_kept():
    """lint-imports itself: the layers contract (also indirect chains) and acyclic packages."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 broken" in done.stdout


def test_no_module_imports_up_a_layer_or_in_a_cycle():
    g = graph()
    table = layers()
    assert cycles(g) == []
    assert upward_imports(g, table) == []


def test_every_module_has_a_layer():
    """A new module must be placed: add it to a layer in pyproject.toml ([tool.importlinter])."""
    g = graph()
    table = layers()
    packages = {m for m in g.modules if (REPO / m.replace(".", "/") / "__init__.py").exists()}
    unplaced = sorted(m for m in g.modules if layer_of(m, table) is None and m not in packages)
    assert unplaced == [], f"modules in no layer of pyproject.toml [tool.importlinter]: {unplaced}"


def figures() -> dict[str, int]:
    g = graph()
    table = layers()
    return {
        "modules": len(g.modules),
        "imports": sum(len(g.find_modules_directly_imported_by(m)) for m in g.modules),
        "layers": len(table),
        "cycles": len(cycles(g)),
        "upward_imports": len(upward_imports(g, table)),
    }


if __name__ == "__main__":
    print(figures())
