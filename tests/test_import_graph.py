"""The import graph of the project's own packages, read with `ast` (nothing is imported).

Every `import` counts, also those inside functions (a lazy import hides a cycle, it does not
remove it), with relative imports resolved. The rules:

- no cycle between files;
- the generation path (engine.service, engine.scheduler and all they import) knows nothing of
  HTTP: no Flask, Werkzeug or waitress; the API layer (engine/api/) binds it to a request;
- the server (engine) and the converter (convert) do not import each other; what both need lives
  in ai_engine_common, which imports neither. The one exception is the `ai-engine` command's
  composition root, engine/cli.py, which registers the converter's subcommands (convert/cli.py)
  beside the engine's; only `python -m engine` imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "convert", "ai_engine_common")
HTTP_PACKAGES = frozenset({"flask", "werkzeug", "waitress"})
GENERATION_PATH = ("engine.service", "engine.scheduler")
COMPOSITION_ROOT = ("engine.cli", "convert.cli")  # the one edge between engine and convert
COMPOSITION_ROOT_IMPORTERS = {"engine.__main__"}


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under the given top-level packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _first_party(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` runs: itself, or the closest enclosing package known (`import a.b` of a
    package a.b; `from a import b` where b is a name in a/__init__.py)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def read_imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(first-party modules, other top-level packages) that module `name` imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours = {m.split(".")[0] for m in modules}
    first, other = set(), set()

    def add(target: str) -> None:
        if target.split(".")[0] in ours:
            found = _first_party(target, modules)
            if found and found != name:
                first.add(found)
        else:
            other.add(target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return first, other


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES):
    """({module: first-party modules it imports}, {module: other top-level packages it imports})."""
    modules = find_modules(root, packages)
    edges, external = {}, {}
    for name, path in modules.items():
        edges[name], external[name] = read_imports(name, path, modules)
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def a_cycle(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle through the component's first module, for the failure message."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def reachable(edges: dict[str, set[str]], starts) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return seen


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg import b\n",
        "pkg/b.py": "from .sub import c\nimport json\n",
        "pkg/sub/__init__.py": "from . import c\n",
        "pkg/sub/c.py": "from ..a import f\nfrom .. import a\nif True:\n    import flask.json\n",
        "pkg/d.py": "from pkg.sub import C_NAME\nimport pkg.sub.c\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, external = import_graph(tmp_path, ("pkg",))
    assert edges == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.sub", "pkg.sub.c"}}
    assert external["pkg.b"] == {"json"} and external["pkg.sub.c"] == {"flask"}
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert a_cycle(edges, ["pkg.a", "pkg.b", "pkg.sub.c"]) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_the_graph_is_the_real_one(graph):
    edges, external = graph
    assert {"engine.app", "engine.service", "engine.scheduler", "convert.cli", "ai_engine_common"} <= set(edges)
    assert "engine.settings" in edges["engine.app"] and "flask" in external["engine.app"]


def test_no_import_cycles(graph):
    edges, _ = graph
    found = [f"{' → '.join(a_cycle(edges, component))}  (all of {', '.join(component)})"
             for component in cycles(edges)]
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(found)


@pytest.mark.parametrize("module", GENERATION_PATH)
def test_the_generation_path_knows_no_http(graph, module):
    edges, external = graph
    assert not external[module] & HTTP_PACKAGES, f"{module} imports {sorted(external[module] & HTTP_PACKAGES)}"
    http = {m: sorted(external[m] & HTTP_PACKAGES) for m in sorted(reachable(edges, [module]))
            if external[m] & HTTP_PACKAGES}
    assert not http, f"{module} imports, through its own imports, modules that use HTTP: {http}"


def test_engine_and_convert_do_not_import_each_other(graph):
    edges, _ = graph
    crossing = sorted((src, dst) for src, targets in edges.items() for dst in targets
                      if {src.split(".")[0], dst.split(".")[0]} == {"engine", "convert"})
    assert crossing == [COMPOSITION_ROOT], \
        f"engine and convert meet only in ai_engine_common and the CLI's composition root: {crossing}"
    common = sorted((src, dst) for src, targets in edges.items() if src.split(".")[0] == "ai_engine_common"
                    for dst in targets if dst.split(".")[0] != "ai_engine_common")
    assert not common, f"ai_engine_common imports neither engine nor convert: {common}"


def test_only_the_entry_point_imports_the_composition_root(graph):
    edges, _ = graph
    importers = {src for src, targets in edges.items() if COMPOSITION_ROOT[0] in targets}
    assert importers <= COMPOSITION_ROOT_IMPORTERS, \
        f"{sorted(importers - COMPOSITION_ROOT_IMPORTERS)} import {COMPOSITION_ROOT[0]} (and with it the converter)"
