"""Imports run one way: the package's import graph has no cycle.

Every ``import`` and ``from ... import`` in mlx_dgemma counts, at module level or inside
a function (a function-level import is still a dependency, only a later one), except
under ``if __name__ == "__main__":`` (run as a script, never on import). Importing
``a.b.c`` also imports the package ``a.b``, unless the importer is inside ``a.b``
already; the root package is left out (every module is inside it). A failure names the modules of each cycle and their edges.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mlx_dgemma"


def modules(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    out = {}
    for f in (root / package).rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if _is_main_guard(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Set[str]]:
    mods = modules(root, package)

    def is_module(name: str) -> bool:
        # a Python module or package, or a compiled extension (name.*.so / its C source)
        if name in mods:
            return True
        path = root.joinpath(*name.split("."))
        return any(path.parent.glob(path.name + ".*")) if path.parent.is_dir() else False

    graph: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: Set[str] = set()
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names]
                targets = [s for s in subs if is_module(s)]
                if len(targets) < len(subs):
                    targets.append(target)  # names defined in the module itself
            ancestors = {".".join(here[:i]) for i in range(1, len(here) + 1)}
            for t in targets:
                parts = t.split(".")
                for i in range(2, len(parts) + 1):  # the module, and the packages above it
                    dep = ".".join(parts[:i])  # (but not this module's own, already importing)
                    if dep in mods and dep != name and (dep == t or dep not in ancestors):
                        deps.add(dep)
        graph[name] = deps
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "mlx_dgemma.models.diffusion_gemma" in graph
    found = cycles(graph)
    report = "; ".join(" ".join(f"{v} -> {sorted(graph[v] & set(c))}" for v in c) for c in found)
    assert not found, f"import cycles: {report}"


def test_the_check_finds_a_cycle(tmp_path):
    """The check itself: a package whose modules import each other (one in a function,
    one relatively from a subpackage) is reported, and a __main__ guard is not counted."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("if __name__ == '__main__':\n    from . import a\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b"]] or cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
