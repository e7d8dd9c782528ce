"""finegrain's modules form an acyclic import graph.

The graph is built from the source with ``ast``: every ``import`` / ``from ... import`` anywhere
in a module (inside functions and ``TYPE_CHECKING`` blocks too), relative imports resolved.
Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so an edge goes to every
package on the way (except the importer's own packages, which are already being imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import finegrain

ROOT = Path(finegrain.__file__).resolve().parent


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """``finegrain.x.y`` -> file (a package is named by its ``__init__.py``)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (root.name, *f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute dotted names a module imports (``from p import x`` gives ``p`` and ``p.x``)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the finegrain modules importing it runs (targets and their packages)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)}
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            while name and name not in files:  # `from pkg import function` -> pkg
                name = name.rpartition(".")[0]
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the target and every package above it
                target = ".".join(parts[:i])
                if target in files and target not in own:
                    graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a path
    ``a -> b -> ... -> a`` through the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(_cycle_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component (BFS back to the start)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_finegrain_has_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in finegrain:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_graph_sees_function_relative_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg import top\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")
    (pkg / "top.py").write_text("from .sub.leaf import f\n\ndef g():\n    pass\n")
    (pkg / "ok.py").write_text("import pkg.top\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.leaf"] == {"pkg.top"}  # relative, inside a function
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.leaf"}  # the package __init__ runs too
    assert graph["pkg.ok"] == {"pkg.top"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1]
    assert all(b in graph[a] for a, b in zip(cycles[0], cycles[0][1:])), cycles  # a real path
    assert set(cycles[0]) == {"pkg.sub", "pkg.top"}  # the shortest one: sub/__init__ <-> top
    (pkg / "sub" / "__init__.py").write_text("")
    cycles = find_cycles(import_graph(pkg))  # the function-level import still closes one
    assert cycles == [["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]]
    (pkg / "sub" / "leaf.py").write_text("def f():\n    pass\n")
    assert find_cycles(import_graph(pkg)) == []
