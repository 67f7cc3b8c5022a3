"""Assemble and run the ext_authz server: JWKS clients, token verifier, rate limiter, policy
engine, tool catalog (with its refresher), audit writer, the Authorization servicer, Prometheus
/metrics and OTLP tracing. Envoy reaches it over gRPC (the ext_authz v3 API, with the standard
gRPC health service) or, with ``ext_authz.transport: http``, over its HTTP mode
(``ext_authz.http_front``, health at ``GET /-/health``)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

from ext_authz.catalog import CatalogGate, CatalogRefresher
from ext_authz.http_front import HttpService
from ext_authz.jwks import JwksClient
from ext_authz.jwt import TokenVerifier
from ext_authz.ratelimit import RateLimiter, build_rate_limiter
from ext_authz.servicer import AuthorizationServicer, PolicyEngine
from ext_authz.sessions import SessionBinder, build_session_binder
from ext_authz.settings import Settings
from gateway import inner_tls
from gateway.catalog import Catalog
from gateway.config import ConfigError
from gateway.credentials.provider import CredentialProvider
from gateway.service import SHUTDOWN_GRACE_SECONDS, GrpcService, GrpcSettings
from gateway.signals import run_until_signal
from gateway.telemetry import AuditWriter, OtlpAuditExporter
from gateway.telemetry.audit_chain import CheckpointSigner
from gateway.telemetry.audit_keys import SubjectKeyStore, master_key_from_env

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
# Start-up waits this long at most for the first catalog fetch of every server (a server that is
# down fails fast and is retried in the background; calls to its tools are refused meanwhile).
CATALOG_WARM_SECONDS = 2.0


class ManagedEngine(PolicyEngine, Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Service:
    """A running ext_authz server; ``stop()`` releases everything ``start_service`` made."""

    rpc: GrpcService | HttpService  # the transport front Envoy calls
    servicer: AuthorizationServicer
    jwks: dict[str, JwksClient]
    catalog: CatalogGate
    refresher: CatalogRefresher
    audit: AuditWriter
    _session: aiohttp.ClientSession
    _limiter: RateLimiter
    _engine: ManagedEngine
    _catalog_writer: Catalog
    _sessions: SessionBinder
    _credentials: CredentialProvider | None = None
    _stopped: bool = field(default=False)

    @property
    def port(self) -> int:
        return self.rpc.port

    @property
    def metrics_port(self) -> int:
        return self.rpc.metrics.port

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.rpc.drain(grace)
        await self.refresher.close()
        # After the server: checks still in flight get their audit entries committed.
        await self.audit.close()
        await self._engine.close()
        await self._limiter.close()
        await self._sessions.close()
        if self._credentials is not None:
            await self._credentials.close()
        await self._session.close()
        self.catalog.catalog.close()
        self._catalog_writer.close()
        await self.rpc.close()


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
        # Shared through the rate limiter's Redis when it has one (every process sees a binding).
        sessions = build_session_binder(
            settings.rate_limits.backend, settings.rate_limits.redis_url,
            timeout=settings.redis_timeout_seconds, ttl=settings.session_idle_seconds,
            max_bindings=settings.max_session_bindings, processes=settings.processes)
        cleanup.append(sessions.close)
        # Opening creates the schema under the database write lock: off the event loop.
        reader = await asyncio.to_thread(Catalog, settings.catalog.path, mode=settings.catalog.mode)
        cleanup.append(_async(reader.close))
        writer = await asyncio.to_thread(Catalog, settings.catalog.path, mode=settings.catalog.mode)
        cleanup.append(_async(writer.close))
        gate = CatalogGate(reader, sorted(settings.servers),
                           refresh_seconds=settings.catalog.refresh_seconds)
        refresher = CatalogRefresher(gate, writer, settings.server_targets, session)
        # Health says NOT_SERVING until the policy is loaded and the keys are warm.
        front = GrpcSettings("ext_authz", SERVICE_NAME, settings.listen,
                             metrics_host=settings.telemetry.metrics_host,
                             metrics_port_offset=settings.telemetry.metrics_port_offset,
                             otlp_endpoint=settings.telemetry.otlp_endpoint,
                             tls=inner_tls.files_from_env())
        service: GrpcService | HttpService
        if settings.transport == "http":
            service = await HttpService.open(front, max_body=settings.max_request_bytes)
        else:
            service = await GrpcService.open(front)
        cleanup.append(service.close)
        port = service.port
        exporter = None
        if settings.audit.otlp_export and settings.telemetry.otlp_endpoint:
            exporter = OtlpAuditExporter(settings.telemetry.otlp_endpoint, "ext_authz")
        # A configured checkpoint key that cannot be loaded fails start-up (ValueError names the key).
        signer = (CheckpointSigner.from_file(settings.audit.signing_key)
                  if settings.audit.signing_key else None)
        keys = None
        if settings.audit.master_key:
            # Personal fields sealed per subject (crypto-shredding); the key store is shared by
            # every writer of the trail. A missing or malformed key fails start-up, naming it.
            master = master_key_from_env(settings.audit.master_key)
            if master is None:
                name = settings.audit.master_key
                raise ConfigError(f"audit.master_key: the secret {name} is not set in this process's "
                                  f"environment (nor {name}_FILE)")
            keys = await asyncio.to_thread(SubjectKeyStore, settings.audit.dir, master)
            cleanup.append(_async(keys.close))
        audit = AuditWriter(settings.audit_path(port), max_bytes=settings.audit.max_bytes,
                            keep=settings.audit.keep, exporter=exporter, signer=signer,
                            checkpoint_seconds=settings.audit.checkpoint_seconds, keys=keys,
                            retention_days=settings.audit.retention_days, sync=settings.audit.sync,
                            sync_interval=settings.audit.sync_interval_ms / 1000)
        await audit.start()  # a file held by another writer fails start-up: no silent gaps
        cleanup.append(audit.close)
        # The upstream credentials' secrets come from ext_authz's environment, read once here.
        credentials = CredentialProvider(settings.credentials, os.environ)
        cleanup.append(credentials.close)
        servicer = AuthorizationServicer(settings, verifier, limiter, engine, catalog=gate,
                                         audit=audit, tracing=service.tracing, sessions=sessions,
                                         credentials=credentials)
        # With identity.assertion on, the catalog fetch presents the gateway's own assertion.
        refresher.identity = servicer.catalog_identity
        if isinstance(service, HttpService):
            service.register(servicer)
        else:
            service.register(
                lambda server: pb_grpc.add_AuthorizationServicer_to_server(servicer, server))
        await engine.start()
        await service.start()
        cleanup.append(lambda: service.drain(None))
        refresher.start()
        cleanup.append(refresher.close)
        await asyncio.gather(*(client.refresh() for client in jwks.values()))
        await refresher.wait_first_attempts(CATALOG_WARM_SECONDS)
        await service.set_serving()
    except BaseException:
        for close in reversed(cleanup):
            await close()
        raise
    logger.info("ext_authz serving %s on %s:%d (policy %s, rate limits %s, dry_run=%s, metrics on "
                "%s:%d, audit %s, catalog %s)", settings.transport, settings.listen.host, port,
                settings.policy.engine, settings.rate_limits.backend, settings.policy.dry_run,
                service.metrics.host, service.metrics.port, audit.path, settings.catalog.path)
    return Service(service, servicer, jwks, gate, refresher, audit, session, limiter, engine,
                   writer, sessions, credentials)


def _async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        close()
    return run


async def serve(settings: Settings, engine: ManagedEngine) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    service = await start_service(settings, engine)
    await run_until_signal(service.stop)


