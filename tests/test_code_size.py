"""Size limits of the project's code, read with `ast` (nothing is imported): no class over
MAX_CLASS_LINES lines, no function (or method) over MAX_FUNCTION_LINES, in engine/, convert/ and
scripts/ (#19). A class that outgrows the limit is split along what it owns into collaborators;
a function, into the steps it takes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("engine", "convert", "scripts")
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 80


def oversized(source: str, name: str = "<source>") -> list[str]:
    """'file:line kind name (N lines)' for every class or function in `source` over its limit. A
    definition's lines run from its first decorator to its last line, docstring and comments in."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.ClassDef):
            kind, limit = "class", MAX_CLASS_LINES
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind, limit = "function", MAX_FUNCTION_LINES
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        lines = node.end_lineno - first + 1
        if lines > limit:
            found.append(f"{name}:{node.lineno} {kind} {node.name} ({lines} lines, at most {limit})")
    return found


def _body(n: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(n))


@pytest.mark.parametrize(("source", "expected"), [
    ("def f():\n" + _body(MAX_FUNCTION_LINES - 1), []),  # exactly at the limit
    ("def f():\n" + _body(MAX_FUNCTION_LINES), ["function f"]),
    ("async def g():\n" + _body(MAX_FUNCTION_LINES), ["function g"]),
    ("@decorator\ndef f():\n" + _body(MAX_FUNCTION_LINES - 1), ["function f"]),  # the decorator counts
    ("class C:\n    def m(self):\n" + "    " + _body(MAX_FUNCTION_LINES).replace("\n    ", "\n        "),
     ["function m"]),  # a method, nested
    ("class C:\n" + _body(MAX_CLASS_LINES - 1), []),
    ("class C:\n" + _body(MAX_CLASS_LINES), ["class C"]),
])
def test_the_walker_measures_definitions(source, expected):
    found = oversized(source)
    assert [" ".join(f.split()[1:3]) for f in found] == expected, found


def test_no_class_or_function_is_over_its_limit():
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += oversized(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "split these along what they own:\n" + "\n".join(found)
