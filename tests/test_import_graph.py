"""finegrain's modules form an acyclic import graph.

The graph is built from the source with ``ast``: every ``import`` / ``from ... import`` anywhere
in a module (inside functions and ``TYPE_CHECKING`` blocks too), relative imports resolved.
Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so an edge goes to every
package on the way (except the importer's own packages, which are already being imported).
The package graph (``finegrain/<name>`` or a top-level module) has no cycle either and follows
the staircase of docs/ARCHITECTURE.md: a package imports only packages on lower steps.
"""

from __future__ import annotations

import ast
import functools
import re
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


# ---- packages ------------------------------------------------------------------------
DOC = ROOT.parent / "docs" / "ARCHITECTURE.md"


def package_of(module: str) -> str:
    """``finegrain.train.trainer`` -> ``finegrain.train``; a top-level module (``finegrain.api``)
    is its own package; the root package stays itself."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """package -> {package it imports: the module imports making that edge, ``a -> b``}."""
    out: dict[str, dict[str, list[str]]] = {package_of(m): {} for m in graph}
    for module, targets in graph.items():
        src = package_of(module)
        for target in sorted(targets):
            dst = package_of(target)
            if dst != src:
                out[src].setdefault(dst, []).append(f"{module} -> {target}")
    return out


def package_cycles(pgraph: dict[str, dict[str, list[str]]]) -> list[str]:
    """One line per package cycle: the path, then one module import for each of its edges."""
    cycles = find_cycles({p: set(edges) for p, edges in pgraph.items()})
    return [
        " -> ".join(c) + "  (" + "; ".join(pgraph[a][b][0] for a, b in zip(c, c[1:])) + ")"
        for c in cycles
    ]


def staircase(doc: Path = DOC) -> list[set[str]]:
    """The numbered package list of docs/ARCHITECTURE.md, lowest step first: each line
    ``N. `pkg`, `pkg`: ...`` names the packages (``finegrain/<name>``) of step N."""
    steps = []
    for line in doc.read_text().splitlines():
        m = re.match(r"^\d+\. ((?:`[a-z_]+`(?:, )?)+)", line)
        if m:
            steps.append({f"finegrain.{n}" if n != "finegrain" else n
                          for n in re.findall(r"`([a-z_]+)`", m.group(1))})  # fmt: skip
    return steps


@functools.cache
def finegrain_packages() -> dict[str, dict[str, list[str]]]:
    return package_graph(import_graph())


def test_finegrain_has_no_package_cycles() -> None:
    cycles = package_cycles(finegrain_packages())
    assert not cycles, "import cycles between finegrain's packages:\n" + "\n".join(cycles)


def test_packages_import_only_lower_steps_of_the_documented_staircase() -> None:
    steps = staircase()
    step = {p: i for i, ps in enumerate(steps) for p in ps}
    pgraph = finegrain_packages()
    assert sum(len(s) for s in steps) == len(step), "a package is on two steps of the staircase"
    unplaced = sorted(set(pgraph) - set(step))
    assert not unplaced, f"place {unplaced} on the staircase in docs/ARCHITECTURE.md"
    assert not set(step) - set(pgraph), f"no such packages: {sorted(set(step) - set(pgraph))}"
    upward = [f"{a} (step {step[a] + 1}) imports {b} (step {step[b] + 1}): {why[0]}"
              for a, edges in sorted(pgraph.items()) for b, why in sorted(edges.items())
              if step[b] >= step[a]]  # fmt: skip
    assert not upward, "imports that climb the staircase:\n" + "\n".join(upward)


def test_package_graph_sees_cycles_that_modules_do_not_have(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from pkg.b.y import g\n")
    (pkg / "b" / "y.py").write_text("from pkg.a import z\n\ndef g():\n    pass\n")
    (pkg / "a" / "z.py").write_text("")
    (pkg / "top.py").write_text("import pkg.a.x\n")
    graph = import_graph(pkg)
    assert find_cycles(graph) == []  # a.x -> b.y -> a.z: no module cycle ...
    pgraph = package_graph(graph)
    assert pgraph["pkg.top"] == {"pkg.a": ["pkg.top -> pkg.a", "pkg.top -> pkg.a.x"]}
    cycles = package_cycles(pgraph)  # ... but the packages a and b import each other
    assert cycles == ["pkg.a -> pkg.b -> pkg.a  (pkg.a.x -> pkg.b; pkg.b.y -> pkg.a)"]
    (pkg / "b" / "y.py").write_text("def g():\n    pass\n")
    assert package_cycles(package_graph(import_graph(pkg))) == []


def test_staircase_parser_reads_numbered_package_lines(tmp_path: Path) -> None:
    doc = tmp_path / "A.md"
    doc.write_text("intro `x`\n1. `config`, `registry`: leaves\n- `no`\n2. `data`: samples\n")
    assert staircase(doc) == [{"finegrain.config", "finegrain.registry"}, {"finegrain.data"}]


def test_reading_checkpoints_is_not_reachable_through_train() -> None:
    """``finegrain.checkpoint`` reads runs; ``finegrain.train.checkpoint`` only writes and
    resumes and offers none of the reading names (one path to each thing)."""
    import finegrain.checkpoint as reading
    import finegrain.train as train
    import finegrain.train.checkpoint as writing

    assert not set(writing.__all__) & set(reading.__all__), set(writing.__all__) & set(
        reading.__all__
    )
    assert "load_method" not in train.__all__ and not hasattr(writing, "load_method")
