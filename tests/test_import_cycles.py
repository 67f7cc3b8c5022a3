"""The project's packages import each other in one direction: no module import cycle.

The graph is read with ``ast``, not by importing: every import statement counts, those inside
functions too (a function-level import only postpones a cycle to the first call), except the
ones under ``if TYPE_CHECKING:``, which never run. An edge goes to the module an import names
(``from pkg import mod`` to ``pkg.mod`` when that is a module, else to ``pkg``); the parent
packages Python loads on the way are not edges, or every package that imports its own
submodules would be a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "gatewayctl", "ext_authz", "ext_proc", "mcp_servers", "mcp_bridge")


@dataclass(frozen=True)
class Edge:
    target: str
    where: str  # path:line of the import statement


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in ``node`` at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    yield stmt
                yield from _runtime_imports(stmt)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _runtime_imports(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` or its nearest enclosing module that is one of ``modules``."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, list[Edge]]:
    modules = module_files(root, packages)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: list[Edge] = []
        for stmt in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            where = f"{path.relative_to(root)}:{stmt.lineno}"
            targets: list[str | None] = []
            if isinstance(stmt, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in stmt.names]
            else:
                base = stmt.module or ""
                if stmt.level:
                    anchor = module.split(".")
                    drop = stmt.level - 1 if is_package else stmt.level
                    anchor = anchor[:len(anchor) - drop]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in stmt.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _resolve(base, modules))
            edges.extend(Edge(t, where) for t in targets if t is not None and t != module)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[tuple[str, Edge]]]:
    """One cycle per strongly connected component with more than one module, each as the
    (module, import) steps that lead from its first module back to it (the component's other
    modules, if any, are on further cycles through these)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, component) for component in sorted(components)]


def _cycle_in(graph: dict[str, list[Edge]], component: list[str]) -> list[tuple[str, Edge]]:
    """The shortest way round from the component's first module back to it (breadth first)."""
    members = set(component)
    start = component[0]
    came_from: dict[str, tuple[str, Edge]] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members:
                    continue
                if edge.target == start:
                    steps = [(node, edge)]
                    while node != start:
                        node, via = came_from[node]
                        steps.append((node, via))
                    return steps[::-1]
                if edge.target not in came_from:
                    came_from[edge.target] = (node, edge)
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no way round {component}")  # a component always has one


def describe(cycle: list[tuple[str, Edge]]) -> str:
    return " -> ".join(f"{module} ({edge.where})" for module, edge in cycle) + f" -> {cycle[0][0]}"


def test_the_packages_have_no_import_cycle() -> None:
    """No chain of imports between the project's modules leads back to where it started."""
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), f"{package} is not a package any more"
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 100  # the walk found the sources
    cycles = [describe(cycle) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles (one per group of modules that import each other):\n" + \
        "\n".join(cycles)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_function_level_import_still_closes_a_cycle(tmp_path: Path) -> None:
    """A cycle whose closing import sits inside a function is reported, with its lines."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/iface.py": "def build():\n    from pkg.impl import Impl\n    return Impl()\n",
        "pkg/impl.py": "from pkg.iface import build\n\nclass Impl: ...\n",
    })
    (cycle,) = find_cycles(import_graph(tmp_path, ["pkg"]))
    assert describe(cycle) == "pkg.iface (pkg/iface.py:2) -> pkg.impl (pkg/impl.py:1) -> pkg.iface"


@pytest.mark.parametrize("spelling", ["from pkg import b", "from . import b", "from .b import x",
                                      "import pkg.b.x"])
def test_every_spelling_of_an_import_is_an_edge(tmp_path: Path, spelling: str) -> None:
    """Absolute, relative and dotted imports of a module all count."""
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": spelling + "\n", "pkg/b.py": "import pkg.a\n"})
    (cycle,) = find_cycles(import_graph(tmp_path, ["pkg"]))
    assert [module for module, _ in cycle] == ["pkg.a", "pkg.b"]


def test_type_checking_imports_and_parent_packages_are_not_edges(tmp_path: Path) -> None:
    """Annotation-only imports never run, and a package importing its submodules is no cycle."""
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.b import B\nclass A: ...\n",
        "pkg/b.py": "from pkg.a import A\nclass B: ...\n",
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert [e.target for e in graph["pkg.a"]] == []
    assert find_cycles(graph) == []


# Layering: what runs behind the gateway does not depend on the gateway's Envoy filters.
BEHIND_THE_GATEWAY = ("mcp_servers", "mcp_bridge", "mcp_aggregator")
FILTERS = ("ext_authz", "ext_proc")


def _in(module: str, packages: Iterable[str]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def test_servers_bridge_and_aggregator_import_nothing_from_ext_authz_or_ext_proc() -> None:
    """No module of mcp_servers, mcp_bridge or mcp_aggregator reaches ext_authz or ext_proc by
    any chain of imports (a server verifies the caller with gateway.* only: gateway.jwks,
    gateway.assertion)."""
    graph = import_graph(ROOT, (*PACKAGES, "mcp_aggregator"))
    starts = [m for m in graph if _in(m, BEHIND_THE_GATEWAY)]
    assert any(m.startswith("mcp_aggregator") for m in starts)  # the walk found every package
    came_from: dict[str, tuple[str, Edge]] = {}
    frontier, seen = list(starts), set(starts)
    while frontier:
        following = []
        for node in frontier:
            for edge in graph.get(node, []):
                if edge.target not in seen:
                    seen.add(edge.target)
                    came_from[edge.target] = (node, edge)
                    following.append(edge.target)
        frontier = following
    bad = sorted(m for m in seen if _in(m, FILTERS))
    chains = []
    for module in bad:
        steps, node = [], module
        while node in came_from:
            node, edge = came_from[node]
            steps.append(f"{node} ({edge.where})")
        chains.append(" -> ".join([*reversed(steps), module]))
    assert not bad, "imports of the gateway's filters from behind it:\n" + "\n".join(chains)
