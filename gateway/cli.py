"""The ``mcp-gateway`` command line. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description): each module exposes ``register(subparsers)``; commands set ``func``.
COMMAND_MODULES = (
    "gateway.cli_stack",   # up, down, status, token, config
    "gateway.cli_policy",  # policy test, policy eval
    "gateway.cli_catalog",  # catalog list, approve, refresh
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="Enterprise MCP gateway on Envoy")
    parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
