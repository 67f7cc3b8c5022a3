"""The aiohttp application around a :class:`MCPServer`, and the process entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

from aiohttp import web

from mcp_servers.core.logs import configure_logging
from mcp_servers.core.server import MCPServer
from mcp_servers.core.settings import ServerSettings
from mcp_servers.core.transport import Transport

logger = logging.getLogger(__name__)

TRANSPORT_KEY = web.AppKey("mcp_transport", Transport)
SETTINGS_KEY = web.AppKey("mcp_settings", ServerSettings)


def make_app(server: MCPServer, settings: ServerSettings | None = None) -> web.Application:
    """An application serving ``server`` on ``settings.path`` plus ``/health`` and ``/ready``."""
    settings = settings or ServerSettings()
    transport = Transport(server, settings)
    app = web.Application(handler_args={"max_field_size": 16384})
    app[TRANSPORT_KEY] = transport
    app[SETTINGS_KEY] = settings

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "server": server.name})

    async def ready(_request: web.Request) -> web.Response:
        if transport.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)

    async def on_shutdown(_app: web.Application) -> None:
        await transport.begin_shutdown()

    async def on_cleanup(_app: web.Application) -> None:
        await transport.close()

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_route("*", settings.path, transport.handle)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def transport_of(app: web.Application) -> Transport:
    return app[TRANSPORT_KEY]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings()
    parser.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--path", default=defaults.path, help="MCP endpoint path (default %(default)s)")
    parser.add_argument("--allowed-origins", default="",
                        help="comma-separated exact origins allowed besides the allowed hosts")
    parser.add_argument("--allowed-hosts", default=",".join(defaults.allowed_hosts),
                        help="comma-separated Host names accepted ('*' disables the check)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout)
    parser.add_argument("--log-level", default=defaults.log_level)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    def split(value: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return ServerSettings(host=args.host, port=args.port, path=args.path,
                          allowed_origins=split(args.allowed_origins),
                          allowed_hosts=split(args.allowed_hosts), max_body_bytes=args.max_body_bytes,
                          shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


async def run_server(server: MCPServer, settings: ServerSettings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain: not ready, finish in-flight calls, close."""
    app = make_app(server, settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = settings.port
    if runner.addresses:
        port = runner.addresses[0][1]
    logger.info("listening", extra={"server": server.name, "host": settings.host, "port": port,
                                    "path": settings.path})
    try:
        await stop.wait()
        logger.info("shutting down", extra={"server": server.name})
        await app[TRANSPORT_KEY].begin_shutdown()
        if settings.drain_seconds > 0:
            # Give the load balancer time to see /ready fail before the listener closes.
            await asyncio.sleep(settings.drain_seconds)
    finally:
        await runner.cleanup()
    logger.info("stopped", extra={"server": server.name})


def serve_main(build: Callable[[argparse.Namespace], MCPServer],
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> None:
    """Parse flags, build the server, serve until SIGINT/SIGTERM with a graceful shutdown."""
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    server = build(args)
    configure_logging(server.name, settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_server(server, settings, stop)

    asyncio.run(main())
