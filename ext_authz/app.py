"""Assemble and run the ext_authz gRPC server: JWKS clients, token verifier, rate limiter,
policy engine, tool catalog (with its refresher), audit writer, the Authorization servicer, a
standard gRPC health service, Prometheus /metrics and OTLP tracing."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_authz.catalog import CatalogGate, CatalogRefresher
from ext_authz.jwks import JwksClient
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import RateLimiter, build_rate_limiter
from ext_authz.servicer import AuthorizationServicer, PolicyEngine
from ext_authz.settings import Settings
from gateway.catalog import Catalog
from gateway.telemetry import (
    AuditWriter,
    OtlpAuditExporter,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
)
from gateway.telemetry.metrics import MetricsServer

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
SHUTDOWN_GRACE_SECONDS = 2.0
# Start-up waits this long at most for the first catalog fetch of every server (a server that is
# down fails fast and is retried in the background; calls to its tools are refused meanwhile).
CATALOG_WARM_SECONDS = 2.0


class ManagedEngine(PolicyEngine, Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Service:
    """A running ext_authz server; ``stop()`` releases everything ``start_service`` made."""

    server: grpc.aio.Server
    port: int
    servicer: AuthorizationServicer
    health: health.aio.HealthServicer
    jwks: dict[str, JwksClient]
    catalog: CatalogGate
    refresher: CatalogRefresher
    audit: AuditWriter
    metrics: MetricsServer
    _session: aiohttp.ClientSession
    _limiter: RateLimiter
    _engine: ManagedEngine
    _catalog_writer: Catalog
    _tracing: bool
    _stopped: bool = field(default=False)

    @property
    def metrics_port(self) -> int:
        return self.metrics.port

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.refresher.close()
        # After the server: checks still in flight get their audit entries committed.
        await self.audit.close()
        await self._engine.close()
        await self._limiter.close()
        await self._session.close()
        self.catalog.catalog.close()
        self._catalog_writer.close()
        await asyncio.to_thread(self.metrics.close)
        if self._tracing:
            await asyncio.to_thread(shutdown_tracing)


async def start_service(settings: Settings, engine: ManagedEngine, *,
                        limiter: RateLimiter | None = None) -> Service:
    """Start serving on ``settings.listen`` (port 0 picks a free port; see ``Service.port``)."""
    session = aiohttp.ClientSession(headers={"accept": "application/json"})
    jwks = {
        i.issuer: JwksClient(i.jwks_url, session, cooldown=settings.auth.jwks_cooldown_seconds,
                             timeout=settings.auth.jwks_timeout_seconds,
                             max_bytes=settings.jwks_max_bytes, issuer=i.issuer)
        for i in settings.issuers
    }
    cleanup: list[Any] = [session.close]
    try:
        verifier = TokenVerifier({i.issuer: (i, jwks[i.issuer]) for i in settings.issuers}, settings.auth)
        limiter = limiter or build_rate_limiter(settings.rate_limits,
                                                redis_timeout=settings.redis_timeout_seconds)
        # Opening creates the schema under the database write lock: off the event loop.
        reader = await asyncio.to_thread(Catalog, settings.catalog.path, mode=settings.catalog.mode)
        cleanup.append(_async(reader.close))
        writer = await asyncio.to_thread(Catalog, settings.catalog.path, mode=settings.catalog.mode)
        cleanup.append(_async(writer.close))
        gate = CatalogGate(reader, sorted(settings.servers),
                           refresh_seconds=settings.catalog.refresh_seconds)
        refresher = CatalogRefresher(gate, writer, settings.server_urls, session)
        health_servicer = health.aio.HealthServicer()
        # Not serving until the policy is loaded and the keys are warm.
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        # so_reuseport off: a second instance on a taken port must fail, not silently share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        port = server.add_insecure_port(f"{settings.listen.host}:{settings.listen.port}")
        if port == 0:
            raise OSError(f"cannot listen on {settings.listen.host}:{settings.listen.port}")
        exporter = None
        if settings.audit.otlp_export and settings.telemetry.otlp_endpoint:
            exporter = OtlpAuditExporter(settings.telemetry.otlp_endpoint, "ext_authz")
        audit = AuditWriter(settings.audit_path(port), max_bytes=settings.audit.max_bytes,
                            keep=settings.audit.keep, exporter=exporter)
        await audit.start()  # a file held by another writer fails start-up: no silent gaps
        cleanup.append(audit.close)
        metrics_port = port + settings.telemetry.metrics_port_offset if settings.listen.port else 0
        metrics_server = start_metrics_server(settings.telemetry.metrics_host, metrics_port)
        cleanup.append(_async(metrics_server.close))
        tracing = setup_tracing("ext_authz", settings.telemetry.otlp_endpoint)
        servicer = AuthorizationServicer(settings, verifier, limiter, engine, catalog=gate,
                                         audit=audit, tracing=tracing)
        pb_grpc.add_AuthorizationServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await engine.start()
        await server.start()
        cleanup.append(lambda: server.stop(None))
        refresher.start()
        cleanup.append(refresher.close)
        await asyncio.gather(*(client.refresh() for client in jwks.values()))
        await refresher.wait_first_attempts(CATALOG_WARM_SECONDS)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        for close in reversed(cleanup):
            await close()
        raise
    logger.info("ext_authz serving on %s:%d (policy %s, rate limits %s, dry_run=%s, metrics on "
                "%s:%d, audit %s, catalog %s)", settings.listen.host, port,
                settings.policy.engine, settings.rate_limits.backend, settings.policy.dry_run,
                metrics_server.host, metrics_server.port, audit.path, settings.catalog.path)
    return Service(server, port, servicer, health_servicer, jwks, gate, refresher, audit,
                   metrics_server, session, limiter, engine, writer, tracing)


def _async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        close()
    return run


async def serve(settings: Settings, engine: ManagedEngine) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    service = await start_service(settings, engine)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()


