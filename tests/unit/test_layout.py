"""The house keeps its plan: no import cycle, and ``common`` never reaches into Celery or workers.

The import graph is read from the source (every ``import``, function-level ones included), so a
cycle hidden behind a lazy import counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` resolves to ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    # Given a graph with a three-module loop and a tail
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # Then exactly that loop is reported
    assert cycles(edges) == [["a", "b", "c"]]


def test_no_import_cycle_in_common_or_workers() -> None:
    # Given every module's imports (``from pkg.sub import x`` runs ``pkg/__init__.py`` first:
    # that edge from a member to its own package is how Python imports, not a cycle of ours)
    edges = {
        name: {t for t in targets if not name.startswith(f"{t}.")}
        for name, targets in graph().items()
    }
    # Then no module reaches itself again
    assert cycles(edges) == []


def test_common_never_imports_celery_or_workers() -> None:
    # Given the library's modules
    for name, path in modules().items():
        if not name.startswith("common"):
            continue
        # Then none imports Celery or a worker module, at any level
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert not {"celery", "workers"} & set(roots), f"{name} imports {roots}"


def test_the_catalogs_lazy_imports_can_all_be_loaded_up_front() -> None:
    # Given the modules pyiceberg and SQLAlchemy import on first use
    from common.lake.catalog import LAZY_MODULES, preload_catalog_modules

    # When a worker preloads them before taking a task
    missing = preload_catalog_modules()

    # Then every one of them is installed and imported (none would be imported under a time limit)
    assert missing == []
    assert all(name in sys.modules for name in LAZY_MODULES)
