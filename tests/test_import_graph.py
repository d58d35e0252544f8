"""The package's import graph, built from the sources, has no cycle.

Every ``import``/``from ... import`` statement counts, at module level or inside a function (a
deferred import that closes a cycle is still a cycle), except those under ``if TYPE_CHECKING:``,
which never run. ``from package import name`` points to the submodule ``package.name`` when there
is one, else to the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCES = Path(__file__).resolve().parents[1] / "python" / "momkd"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file (``.py``, or a ``.pyi`` stub of an extension module)."""
    top = package_dir.name
    out: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = [top, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if path.suffix == ".py" or name not in out:
            out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = module_files(package_dir)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_nodes(tree)
        is_package = path.stem == "__init__"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_package else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for t in targets:
                dep = owner(t)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_momkd_has_no_import_cycle() -> None:
    graph = import_graph(SOURCES)
    assert "momkd.train.trainer" in graph and "momkd._core" in graph  # the sources were found
    assert "momkd.train.device" in graph["momkd.train.distributed"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    ("files", "want"),
    [
        # A deferred (function-level) import closing the cycle counts.
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import f\n",
                "pkg/b.py": "def f():\n    from pkg import a\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        # Relative imports, three modules.
        (
            {
                "pkg/__init__.py": "",
                "pkg/sub/__init__.py": "",
                "pkg/sub/x.py": "from . import y\n",
                "pkg/sub/y.py": "from ..z import g\n",
                "pkg/z.py": "import pkg.sub.x\n",
            },
            [["pkg.sub.x", "pkg.sub.y", "pkg.z"]],
        ),
        # Under TYPE_CHECKING: no edge, no cycle.
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import f\n",
                "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",
            },
            [],
        ),
    ],
)
def test_cycle_finder_on_hand_made_packages(
    tmp_path: Path, files: dict[str, str], want: list[list[str]]
) -> None:
    assert cycles(import_graph(_write(tmp_path, files))) == want
