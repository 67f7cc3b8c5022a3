"""``python -m mcp_aggregator --host H --port P --upstream-base URL [--config FILE]``."""

from __future__ import annotations

import sys

from gateway import eventloop
from gateway.telemetry.tracing import setup_tracing, shutdown_tracing
from mcp_aggregator.app import run
from mcp_aggregator.settings import AggregatorSettings
from mcp_servers.core.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    try:
        settings = AggregatorSettings.from_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        raise SystemExit(f"mcp_aggregator: {exc}") from None
    configure_logging("mcp_aggregator", settings.log_level)
    setup_tracing("mcp_aggregator", settings.otlp_endpoint)
    try:
        eventloop.run(run(settings))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
