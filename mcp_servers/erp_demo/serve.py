"""Command line of the demo ERP: settings from flags/env at the edge, then run until a signal."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiohttp import web

from gateway import eventloop
from gateway.signals import run_until_signal
from mcp_servers.erp_demo.app import ErpSettings, make_app

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcp_servers.erp_demo", description="Demo ERP REST backend")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed on start-up)")
    p.add_argument("--db", default=":memory:", help="SQLite file; seeded when empty")
    p.add_argument("--api-key-env", default="ERP_API_KEY", help="environment variable holding the API key")
    p.add_argument("--debug", action="store_true", help="enable /_debug/requests and /_debug/faults")
    p.add_argument("--archive-online", action="store_true", help="serve archived invoices (no 206)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def _run(settings: ErpSettings, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addr = runner.addresses[0]
    # Tests and `make run` read this line to learn the port when --port 0 was given.
    print(f"erp_demo listening on http://{addr[0]}:{addr[1]}", flush=True)
    await run_until_signal(runner.cleanup)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    api_key = os.environ.get(args.api_key_env, "")
    if not api_key:
        sys.exit(f"erp_demo: environment variable {args.api_key_env} must hold the API key")
    settings = ErpSettings(api_key=api_key, db_path=args.db, debug=args.debug,
                           archive_online=args.archive_online)
    eventloop.run(_run(settings, args.host, args.port))
