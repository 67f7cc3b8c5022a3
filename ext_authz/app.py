"""Assemble and run the ext_authz gRPC server: JWKS clients, token verifier, rate limiter,
policy engine, the Authorization servicer and a standard gRPC health service."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_authz.jwks import JwksClient
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import RateLimiter, build_rate_limiter
from ext_authz.servicer import AuthorizationServicer, PolicyEngine
from ext_authz.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
SHUTDOWN_GRACE_SECONDS = 2.0


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
    _session: aiohttp.ClientSession
    _limiter: RateLimiter
    _engine: ManagedEngine
    _stopped: bool = field(default=False)

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self._engine.close()
        await self._limiter.close()
        await self._session.close()


async def start_service(settings: Settings, engine: ManagedEngine, *,
                        limiter: RateLimiter | None = None) -> Service:
    """Start serving on ``settings.listen`` (port 0 picks a free port; see ``Service.port``)."""
    session = aiohttp.ClientSession(headers={"accept": "application/json"})
    jwks = {
        i.issuer: JwksClient(i.jwks_url, session, cooldown=settings.auth.jwks_cooldown_seconds,
                             timeout=settings.auth.jwks_timeout_seconds,
                             max_bytes=settings.jwks_max_bytes)
        for i in settings.issuers
    }
    try:
        verifier = TokenVerifier({i.issuer: (i, jwks[i.issuer]) for i in settings.issuers}, settings.auth)
        limiter = limiter or build_rate_limiter(settings.rate_limits,
                                                redis_timeout=settings.redis_timeout_seconds)
        servicer = AuthorizationServicer(settings, verifier, limiter, engine)
        health_servicer = health.aio.HealthServicer()
        # Not serving until the policy is loaded and the keys are warm.
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        # so_reuseport off: a second instance on a taken port must fail, not silently share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_AuthorizationServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"{settings.listen.host}:{settings.listen.port}")
        if port == 0:
            raise OSError(f"cannot listen on {settings.listen.host}:{settings.listen.port}")
        await engine.start()
        await server.start()
        await asyncio.gather(*(client.refresh() for client in jwks.values()))
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await session.close()
        raise
    logger.info("ext_authz serving on %s:%d (policy %s, rate limits %s, dry_run=%s)",
                settings.listen.host, port, settings.policy.engine, settings.rate_limits.backend,
                settings.policy.dry_run)
    return Service(server, port, servicer, health_servicer, jwks, session, limiter, engine)


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


