"""``python -m mcp_bridge --port P [options] -- argv...``: serve a stdio MCP server over HTTP."""

from __future__ import annotations

import sys

from gateway import eventloop
from gateway.telemetry.tracing import setup_tracing, shutdown_tracing
from mcp_bridge.app import run
from mcp_bridge.settings import BridgeSettings
from mcp_servers.core.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    try:
        settings = BridgeSettings.from_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        raise SystemExit(f"mcp_bridge: {exc}") from None
    service = f"mcp_bridge.{settings.name}"
    configure_logging(service, settings.log_level)
    setup_tracing(service, settings.otlp_endpoint)
    try:
        eventloop.run(run(settings))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
