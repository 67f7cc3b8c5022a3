"""The aiohttp application and the process lifecycle: serve, drain on SIGTERM, stop children."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import inner_tls
from gateway.assertion import DEFAULT_LEEWAY_SECONDS
from gateway.inner_peers import guard_app
from gateway.signals import stop_event
from mcp_bridge.child import become_subreaper, reap_orphans
from mcp_bridge.settings import BridgeSettings
from mcp_bridge.transport import Bridge
from mcp_servers.core.identity import identity_context

logger = logging.getLogger(__name__)

BRIDGE_KEY = web.AppKey("mcp_bridge", Bridge)
# Adopted grandchildren that exit between child stops are reaped at this period.
REAP_PERIOD = 2.0


def make_app(settings: BridgeSettings) -> web.Application:
    bridge = Bridge(settings)
    app = web.Application(handler_args={"max_field_size": 16384})
    app[BRIDGE_KEY] = bridge

    async def children(_app: web.Application) -> AsyncIterator[None]:
        bridge.pool.start()
        expiry = asyncio.create_task(bridge.sessions.run_expiry())
        reaper = asyncio.create_task(_reap_forever())
        yield
        expiry.cancel()
        reaper.cancel()
        await bridge.close()
        reap_orphans()

    app.cleanup_ctx.append(children)
    if settings.assertion_jwks is not None:
        assert settings.assertion_issuer is not None and settings.assertion_audience is not None
        app.cleanup_ctx.append(identity_context(
            bridge.identity, settings.assertion_jwks, issuer=settings.assertion_issuer,
            audience=settings.assertion_audience, leeway=DEFAULT_LEEWAY_SECONDS))
    app.router.add_get("/ready", bridge.ready)
    app.router.add_get("/metrics", bridge.metrics)
    app.router.add_get("/-/children", bridge.children)
    app.router.add_route("*", settings.path, bridge.handle)
    return app


async def _reap_forever() -> None:
    while True:
        await asyncio.sleep(REAP_PERIOD)  # periodic sweep
        reap_orphans()


async def run(settings: BridgeSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain, stop every child and exit."""
    become_subreaper()
    stop = stop or stop_event()
    app = make_app(settings)
    # inner_tls: TLS only, reloaded on change; callers: Envoy, and ext_authz's catalog fetch
    # (Prometheus's certificate on GET /metrics only).
    tls = inner_tls.server_tls_from_env(callers=inner_tls.SERVER_CALLERS, scraper=True)
    guard_app(app, tls, settings.name)
    # Handler cancellation: a client closing a 2026-07-28 request's connection cancels it.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=settings.drain_seconds + 1)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port,
                       ssl_context=tls.context if tls is not None else None)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    logger.info("listening", extra={"server": settings.name, "host": settings.host, "port": port,
                                    "path": settings.path, "argv": list(settings.argv)})
    try:
        async with inner_tls.watching(tls):
            await stop.wait()
        logger.info("shutting down", extra={"server": settings.name})
        await app[BRIDGE_KEY].drain()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await runner.cleanup()
    logger.info("stopped", extra={"server": settings.name})
