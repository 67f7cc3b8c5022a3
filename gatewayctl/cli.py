"""The ``mcp-gateway`` command line. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

# Command -> the module whose ``register`` adds it (and the group's other commands). Only the
# group a command line names is imported: the groups pull in different halves of the gateway
# (the policy kit, the catalog and its HTTP clients, the dev stack), and `policy test` should not
# wait for the catalog's imports.
COMMANDS = {"up": "stack", "down": "stack", "reload": "stack", "restart": "stack",
            "status": "stack", "token": "stack", "config": "stack", "policy": "policy",
            "catalog": "catalog", "credentials": "credentials", "keys": "keys", "audit": "audit",
            "workflow": "workflow"}
GROUPS = ("stack", "policy", "catalog", "credentials", "keys", "audit", "workflow")


def _named_group(argv: list[str]) -> str | None:
    """The command group of a command line (None: none named yet, e.g. ``--help``)."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return COMMANDS.get(word)
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="Enterprise MCP gateway on Envoy")
    parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
    sub = parser.add_subparsers(dest="command", required=True)
    group = _named_group(sys.argv[1:] if argv is None else argv)
    # Each module's ``register`` adds its commands, and each command sets ``func``.
    for name in (group,) if group else GROUPS:
        module: ModuleType = importlib.import_module(f"gatewayctl.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        rc: int = args.func(args)
    except BrokenPipeError:  # `mcp-gateway ... | head`: the reader left, nothing to report
        # Python would complain again while flushing stdout at exit.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
