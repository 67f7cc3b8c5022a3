"""Assemble and run the ext_proc gRPC server: policy engine, catalog, the ExternalProcessor
servicer, a standard gRPC health service, Prometheus /metrics and OTLP tracing."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ext_proc.inspect import Inspector, ListPolicy
from ext_proc.servicer import ExternalProcessorServicer
from ext_proc.settings import Settings
from gateway.catalog import Catalog
from gateway.telemetry import setup_tracing, shutdown_tracing
from gateway.telemetry.metrics import MetricsServer, start_metrics_server

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
SHUTDOWN_GRACE_SECONDS = 2.0


class ManagedPolicy(ListPolicy, Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Service:
    """A running ext_proc server; ``stop()`` releases everything ``start_service`` made."""

    server: grpc.aio.Server
    port: int
    servicer: ExternalProcessorServicer
    health: health.aio.HealthServicer
    metrics: MetricsServer
    _policy: ManagedPolicy | None
    _catalog: Catalog | None
    _tracing: bool = False
    _stopped: bool = field(default=False)

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.metrics.close)
        if self._policy is not None:
            await self._policy.close()
        if self._catalog is not None:
            self._catalog.close()
        if self._tracing:
            await asyncio.to_thread(shutdown_tracing)  # flushes the spans still batched


async def start_service(settings: Settings, policy: ManagedPolicy | None, *,
                        catalog: Catalog | None = None) -> Service:
    """Start serving on ``settings.listen`` (port 0 picks a free port; see ``Service.port``).

    ``catalog``: defaults to the one at ``settings.catalog_path`` (None there: no pinning).
    """
    if catalog is None and settings.catalog_path is not None:
        catalog = Catalog(settings.catalog_path)
    metrics: MetricsServer | None = None
    tracing = False
    try:
        inspector = Inspector(policy=policy, list_entrypoints=settings.list_entrypoints,
                              catalog=catalog, replacement=settings.replacement,
                              phone_region=settings.phone_region)
        tracing = setup_tracing("ext_proc", settings.otlp_endpoint)
        servicer = ExternalProcessorServicer(settings, inspector, tracing=tracing)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        # so_reuseport off: a second instance on a taken port must fail, not silently share it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(f"{settings.listen.host}:{settings.listen.port}")
        if port == 0:
            raise OSError(f"cannot listen on {settings.listen.host}:{settings.listen.port}")
        # A fixed port pair in deployments (Prometheus targets are static); any free one in tests.
        metrics_port = port + settings.metrics_port_offset if settings.listen.port else 0
        metrics = start_metrics_server(settings.metrics_host, metrics_port)
        if policy is not None:
            await policy.start()
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        if tracing:
            shutdown_tracing()
        if metrics is not None:
            metrics.close()
        if catalog is not None:
            catalog.close()
        raise
    logger.info("ext_proc serving on %s:%d (metrics on %s:%d, catalog %s, list filters %s, "
                "traces to %s)", settings.listen.host, port, metrics.host, metrics.port,
                settings.catalog_path, dict(settings.list_entrypoints),
                settings.otlp_endpoint if tracing else "nowhere")
    return Service(server, port, servicer, health_servicer, metrics, policy, catalog, tracing)


async def serve(settings: Settings, policy: ManagedPolicy | None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    service = await start_service(settings, policy)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
