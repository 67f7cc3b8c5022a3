"""The command line imports only the command group it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gatewayctl.cli import COMMANDS, _named_group, build_parser


@pytest.mark.parametrize(("argv", "group"), [
    (["policy", "test"], "policy"), (["--config", "x.yaml", "catalog", "list"], "catalog"),
    (["--config", "policy", "up"], "stack"), (["--help"], None), ([], None), (["nope"], None),
])
def test_the_named_group(argv: list[str], group: str | None) -> None:
    assert _named_group(argv) == group


def test_every_command_is_registered_by_its_group() -> None:
    """Without a named group every group registers; each command maps to the group that adds it."""
    parser = build_parser([])
    full = {"config": ["config", "render"], "policy": ["policy", "test"], "catalog": ["catalog", "list"],
            "restart": ["restart", "files"], "credentials": ["credentials", "list"],
            "keys": ["keys", "list"], "audit": ["audit", "verify"],
            "workflow": ["workflow", "validate", "x.yaml"]}
    for command, group in COMMANDS.items():
        argv = full.get(command, [command])
        assert build_parser(argv).parse_args(argv).command == command, group
        assert parser.parse_args(argv).command == command


def test_policy_commands_do_not_import_the_catalog() -> None:
    code = ("import sys; from gatewayctl.cli import build_parser; build_parser(['policy', 'test']);"
            "print(sorted(m for m in ('gateway.catalog.client', 'gatewayctl.devstack', "
            "'gatewayctl.commands.stack') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"
