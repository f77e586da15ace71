"""The import graph among modrt's own modules: no cycles, and DESIGN.md §2's direction.

Built from the source files with ``ast`` (nothing is imported), so it sees every import a
module can make: module-level ones and the lazy ones inside functions, but not those under
``if TYPE_CHECKING:`` (never run). ``from modrt import x`` is an edge to ``modrt.x`` when
``x`` is a submodule, else to ``modrt``. Importing a submodule also runs its parents'
``__init__``; that implicit edge is not counted (every child would otherwise "cycle" with
a parent that imports it). A ``"module:attribute"`` string naming one of our modules (the
lazy sub-commands in modrt/cli.py, resolved with importlib) is an edge too.

    train -> export -> modrt (core) <- serve      imports flow one way
    core: never modrt.train / modrt.export / modrt.serve, never torch
    serve: never modrt.train / modrt.export
"""

from __future__ import annotations

import ast
import fnmatch
import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("modrt.train", "modrt.export", "modrt.serve")  # the sub-packages above the core

# Import edges (importer, imported; fnmatch patterns) the cycle check leaves out. Keep it
# short: each entry says why its cycle is not broken by moving a name here.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}
# The one module whose "module:attribute" strings may name any layer: DESIGN.md §2, "the
# CLI imports each sub-command's package lazily".
DISPATCHER = "modrt.cli"
COMMAND = re.compile(r"^(modrt(?:\.[A-Za-z_]\w*)*):[A-Za-z_]\w*$")

# Core modules allowed to import torch lazily (inside a function, never at module level).
# None today: bench's PyTorch peers live in modrt.train (entry points, modrt/peers.py).
LAZY_TORCH: dict[str, str] = {}


# --------------------------------------------------------------------------- the graph


def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """``[tool.setuptools] package-dir``: dotted package name -> its source directory."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the one inline table, read by hand
        table = re.search(r"^package-dir\s*=\s*\{([^}]*)\}", text, re.M)
        assert table, "pyproject.toml has no [tool.setuptools] package-dir"
        mapping = dict(re.findall(r'"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1)))
    else:
        mapping = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def module_files(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module's dotted name -> its file. A folder mapped to a package of its own
    (train/ -> modrt.train) wins over a path under another mapped folder."""
    files: dict[str, Path] = {}
    for package, root in sorted(dirs.items(), key=lambda kv: len(kv[0])):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if "__pycache__" in parts or any(not p.isidentifier() for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, bool]]:
    """(absolute dotted target, at module level?) for each import the module can run.

    ``from a.b import c`` targets ``a.b.c`` when that is one of the ``known`` modules, else
    ``a.b`` (c is a name in it)."""
    out: list[tuple[str, bool]] = []
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in known else base, top))
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return out


def resolve(target: str, known: set[str]) -> str | None:
    """The deepest known module that ``target`` names or lies in; None: not ours."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in known:
            return name
    return None


class Graph(NamedTuple):
    imports: dict[str, set[str]]  # module -> our modules its import statements name
    commands: dict[str, set[str]]  # module -> our modules its "module:attribute" strings name
    external: dict[str, set[tuple[str, bool]]]  # module -> (top-level package, at module level?)

    def edges(self) -> dict[str, set[str]]:
        return {m: self.imports[m] | self.commands[m] for m in self.imports}


def build_graph(files: dict[str, Path]) -> Graph:
    known = set(files)
    g = Graph({m: set() for m in files}, {m: set() for m in files}, {m: set() for m in files})
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, top in imports_of(tree, module, path.name == "__init__.py", known):
            ours = resolve(target, known)
            if ours is not None:
                if ours != module:
                    g.imports[module].add(ours)
            elif target.split(".")[0] != "modrt":
                g.external[module].add((target.split(".")[0], top))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                match = COMMAND.match(node.value)
                if match and match.group(1) in known and match.group(1) != module:
                    g.commands[module].add(match.group(1))
    return g


def _ignored(a: str, b: str, ignore: Iterable[tuple[str, str]]) -> bool:
    return any(fnmatch.fnmatchcase(a, pa) and fnmatch.fnmatchcase(b, pb) for pa, pb in ignore)


def cycles(graph: dict[str, set[str]], ignore: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """One shortest cycle per strongly connected component, as [a, b, ..., a]."""
    return [cycle for _, cycle in components(graph, ignore)]


def components(graph: dict[str, set[str]], ignore: Iterable[tuple[str, str]] = ()
               ) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component with a cycle (Tarjan): (its modules, a shortest
    cycle through the first of them)."""
    ignore = list(ignore)
    edges = {a: sorted(b for b in bs if b in graph and not _ignored(a, b, ignore)) for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[list[str], list[str]]] = []

    def component(root: str) -> None:  # iterative Tarjan: deep import chains, no recursion limit
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    members.append(m)
                    if m == node:
                        break
                if len(members) > 1 or node in edges[node]:
                    found.append((sorted(members), _shortest_cycle(edges, set(members))))

    for node in sorted(edges):
        if node not in index:
            component(node)
    return sorted(found)


def _shortest_cycle(edges: dict[str, list[str]], members: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (BFS back to itself)."""
    start = min(members)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in edges[node]:
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in component {sorted(members)}")


def _layer(module: str) -> str:
    """modrt.train / modrt.export / modrt.serve, or 'core' for the rest of modrt."""
    return next((p for p in LAYERS if module == p or module.startswith(p + ".")), "core")


def direction_violations(g: Graph) -> list[str]:
    """Edges against DESIGN.md §2: core -> train/export/serve, serve -> train/export. The
    DISPATCHER's command strings are exempt."""
    forbidden = {"core": set(LAYERS), "modrt.serve": {"modrt.train", "modrt.export"}}
    edges = {m: g.imports[m] | (set() if m == DISPATCHER else g.commands[m]) for m in g.imports}
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if _layer(b) in forbidden.get(_layer(a), ()))


def torch_violations(g: Graph) -> list[str]:
    """Core modules importing torch: at module level anywhere, in a function outside LAZY_TORCH."""
    return sorted(f"{m} ({'module level' if top else 'in a function'})" for m, names in g.external.items()
                  if _layer(m) == "core" for name, top in names
                  if name == "torch" and (top or m not in LAZY_TORCH))


@pytest.fixture(scope="module")
def project() -> Graph:
    files = module_files(package_dirs())
    assert {"modrt", "modrt.cli", "modrt.runtime.model", "modrt.train", "modrt.serve.cli"} <= set(files)
    return build_graph(files)


# --------------------------------------------------------------------------- the checker itself


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": {"f", "a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"], ["f", "g", "f"]]
    assert cycles(graph, ignore={("c", "a"), ("e", "e")}) == [["f", "g", "f"]]
    assert cycles(graph, ignore={("*", "a"), ("?", "e")}) == [["f", "g", "f"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # the shortest way round, not the first one found
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}) == [["a", "c", "a"]]
    # two cycles through one module: both ways round are in one component, one is shown;
    # leaving out the edge it uses shows the other
    graph = {"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "a"]]
    assert cycles(graph, ignore={("b", "a")}) == [["a", "c", "d", "a"]]


def test_imports_are_read_the_way_python_runs_them(tmp_path):
    src = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy as np\n"
        "from modrt import bundle, load\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from modrt.runtime.model import Model\n"
        "else:\n"
        "    import modrt.routing\n"
        "def f():\n"
        "    import torch\n"
        "    from modrt.runtime.sessions import cores\n"
    )
    pkg = tmp_path / "modrt"
    pkg.mkdir()
    for name in ("__init__", "bundle", "routing", "here"):
        (pkg / f"{name}.py").write_text(src if name == "here" else "")
    (pkg / "sibling.py").write_text("def f():\n    from modrt import bundle\n")
    (pkg / "runtime").mkdir()
    for name in ("__init__", "model", "sessions"):
        (pkg / "runtime" / f"{name}.py").write_text("")
    (pkg / "cli.py").write_text('LAZY = {"go": ("modrt.here:f", "help"), "no": "modrt.nothing:f"}\n')
    g = build_graph(module_files({"modrt": pkg}))
    graph, external = g.imports, g.external
    assert g.commands["modrt.cli"] == {"modrt.here"} and graph["modrt.cli"] == set()
    assert graph["modrt.here"] == {"modrt.bundle", "modrt", "modrt.sibling", "modrt.routing",
                                   "modrt.runtime.sessions"}
    assert graph["modrt.sibling"] == {"modrt.bundle"}  # not modrt: a submodule's parent is implicit
    assert external["modrt.here"] == {("__future__", True), ("typing", True), ("numpy", True), ("torch", False)}


def test_the_direction_rules_catch_what_they_should(monkeypatch):
    monkeypatch.setitem(LAZY_TORCH, "modrt.peers", "allowed in this check")
    mods = ["modrt.bundle", "modrt.cli", "modrt.peers", "modrt.serve.app", "modrt.train.model", "modrt.export"]
    imports = {m: set() for m in mods}
    commands = {m: set() for m in mods}
    external: dict[str, set[tuple[str, bool]]] = {m: set() for m in mods}
    imports["modrt.bundle"] = {"modrt.serve.app"}  # core -> serve
    imports["modrt.serve.app"] = {"modrt.export", "modrt.bundle"}  # serve -> export; serve -> core is fine
    imports["modrt.train.model"] = {"modrt.export", "modrt.bundle"}  # train may import anything below it
    commands["modrt.cli"] = {"modrt.train.model", "modrt.serve.app"}  # the dispatcher's sub-commands
    commands["modrt.peers"] = {"modrt.train.model"}  # anyone else's: a violation
    assert direction_violations(Graph(imports, commands, external)) == [
        "modrt.bundle -> modrt.serve.app", "modrt.peers -> modrt.train.model", "modrt.serve.app -> modrt.export"]
    external["modrt.peers"] = {("torch", False)}  # allowed: LAZY_TORCH, in a function
    external["modrt.cli"] = {("torch", False)}
    external["modrt.bundle"] = {("torch", True)}
    external["modrt.train.model"] = {("torch", True)}  # train is torch's home
    assert torch_violations(Graph(imports, commands, external)) == [
        "modrt.bundle (module level)", "modrt.cli (in a function)"]
    external["modrt.peers"] = {("torch", True)}
    assert "modrt.peers (module level)" in torch_violations(Graph(imports, commands, external))


# --------------------------------------------------------------------------- the project


def test_no_import_cycles(project):
    found = components(project.edges(), ignore=KNOWN_CYCLE_EDGES)
    assert not found, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(cycle)}\n    (one of the cycles among {', '.join(members)})" for members, cycle in found)


def test_known_cycle_edges_are_still_needed(project):
    """An exception whose edges are gone, or whose cycle is gone, is removed from the list."""
    edges = project.edges()
    for pattern in KNOWN_CYCLE_EDGES:
        matched = [(a, b) for a, bs in edges.items() for b in bs if _ignored(a, b, [pattern])]
        assert matched, f"KNOWN_CYCLE_EDGES {pattern}: no such import any more; remove the entry"
        rest = [p for p in KNOWN_CYCLE_EDGES if p != pattern]
        assert cycles(edges, ignore=rest), f"KNOWN_CYCLE_EDGES {pattern}: no cycle without it; remove it"


def test_imports_flow_one_way(project):
    """DESIGN.md §2: core never imports train/export/serve; serve never train/export."""
    bad = direction_violations(project)
    assert not bad, "imports against DESIGN.md §2's direction:\n  " + "\n  ".join(bad)


def test_the_core_never_imports_torch(project):
    """DESIGN.md §1-2: modrt/ is numpy + onnxruntime. Lazily, only where LAZY_TORCH says."""
    bad = torch_violations(project)
    assert not bad, "torch imported by the core: " + ", ".join(bad)
    stale = [m for m in LAZY_TORCH if ("torch", False) not in project.external.get(m, ())]
    assert not stale, f"remove these from LAZY_TORCH, they no longer import torch: {stale}"
