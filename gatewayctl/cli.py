"""The ``mcp-gateway`` command line. Each command group lives in its own module."""

from __future__ import annotations

import argparse
import sys

from gatewayctl.commands import catalog, policy, stack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-gateway", description="Enterprise MCP gateway on Envoy")
    parser.add_argument("--config", help="gateway config file (default: the embedded dev config)")
    sub = parser.add_subparsers(dest="command", required=True)
    # Each module's ``register`` adds its commands, and each command sets ``func``.
    stack.register(sub)    # up, down, status, token, config
    policy.register(sub)   # policy test, policy eval
    catalog.register(sub)  # catalog list, approve, refresh
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
