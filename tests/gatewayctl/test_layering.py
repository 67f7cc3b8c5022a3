"""The core and the services never import the operator tooling (``gatewayctl``).

Read with ``ast``, not by importing: every import statement counts, those inside functions too,
and so does ``importlib.import_module`` / ``__import__`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLING = "gatewayctl"
# The shared core and every service the gateway runs.
RUNTIME_PACKAGES = ("gateway", "ext_authz", "ext_proc", "mcp_servers", "mcp_bridge")
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def _names_tooling(module: str) -> bool:
    return module == TOOLING or module.startswith(TOOLING + ".")


def tooling_imports(source: str) -> Iterator[tuple[int, str]]:
    """(line, imported name) of every import of the tooling package in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if _names_tooling(a.name))
        elif isinstance(node, ast.ImportFrom):
            # Relative imports stay inside their own package, which is never the tooling here.
            if node.level == 0 and node.module and _names_tooling(node.module):
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (name in DYNAMIC_IMPORTS and isinstance(first, ast.Constant)
                    and isinstance(first.value, str) and _names_tooling(first.value)):
                yield node.lineno, first.value


def runtime_files() -> list[Path]:
    files: list[Path] = []
    for package in RUNTIME_PACKAGES:
        folder = ROOT / package
        assert (folder / "__init__.py").is_file(), f"{package} is not a package under {ROOT}"
        files += sorted(folder.rglob("*.py"))
    return files


def test_runtime_packages_never_import_the_tooling() -> None:
    """No module of the core or of a service imports gatewayctl, at top level or in a function."""
    found = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in runtime_files()
             for line, name in tooling_imports(path.read_text(encoding="utf-8"))]
    assert found == [], "the core and the services must not import gatewayctl:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import gatewayctl",
    "import gatewayctl.devstack as d",
    "from gatewayctl import tokens",
    "from gatewayctl.envoy_config import render",
    "def f():\n    from gatewayctl.cli import main\n",
    "import importlib\nimportlib.import_module('gatewayctl.commands.stack')",
    "__import__('gatewayctl')",
])
def test_every_form_of_import_is_found(source: str) -> None:
    """The check sees each way a module can import the tooling."""
    assert [name for _, name in tooling_imports(source)]


@pytest.mark.parametrize("source", [
    "import gateway.config",
    "from gateway import wire",
    "import gatewayctlx",
    "from . import gatewayctl",
    "x = 'gatewayctl'",
])
def test_other_imports_are_not_flagged(source: str) -> None:
    """Core imports, look-alike names and plain strings are not imports of the tooling."""
    assert list(tooling_imports(source)) == []
