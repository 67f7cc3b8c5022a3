"""What the command line imports: nothing of a command group until a command line names it, and
for `policy test` nothing that another group pulls in (each check in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gatewayctl.cli import GROUPS

ROOT = Path(__file__).resolve().parents[2]
COMMAND_MODULES = sorted(p.stem for p in (ROOT / "gatewayctl" / "commands").glob("*.py")
                         if p.stem != "__init__")
# What the other groups load and `policy test` needs none of: the catalog's HTTP client, the dev
# stack, the audit trail's signatures, the services' gRPC, the workflow server.
HEAVY = ("aiohttp", "cryptography", "grpc", "gateway.catalog", "gateway.telemetry",
         "gatewayctl.devstack", "mcp_servers")

REPORT = """
import contextlib, io, json, sys
{setup}
commands = {{m for m in sys.modules if m.startswith("gatewayctl.commands.")}}
heavy = {{h for h in {heavy!r} if any(m == h or m.startswith(h + ".") for m in sys.modules)}}
print(json.dumps(sorted(commands | heavy)))
"""


def loaded_after(setup: str) -> list[str]:
    """The command modules in sys.modules once ``setup`` has run, and each HEAVY package of which
    any module is."""
    code = REPORT.format(setup=setup, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True, cwd=ROOT)
    loaded: list[str] = json.loads(out.stdout.splitlines()[-1])
    return loaded


def test_every_group_is_a_command_module() -> None:
    """The modules this file watches are the groups the CLI loads (plus the policy's helper)."""
    assert set(GROUPS) <= set(COMMAND_MODULES)


def test_importing_the_cli_loads_no_command() -> None:
    """`import gatewayctl.cli` loads no command module and nothing heavy."""
    assert loaded_after("import gatewayctl.cli") == []


def test_policy_test_loads_only_the_policy_commands() -> None:
    """A whole `mcp-gateway policy test` run on the shipped policies loads the policy group's
    modules and no other group's, nor what those groups pull in."""
    setup = ("from gatewayctl.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    assert main(['policy', 'test', '--dir', {str(ROOT / 'policies')!r}]) == 0")
    assert loaded_after(setup) == ["gatewayctl.commands.policy", "gatewayctl.commands.policy_check"]
