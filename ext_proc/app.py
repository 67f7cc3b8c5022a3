"""Assemble and run the ext_proc gRPC server: policy engine, catalog, the ExternalProcessor
servicer, a standard gRPC health service, Prometheus /metrics and OTLP tracing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ext_proc.inspect import Inspector, ListPolicy
from ext_proc.servicer import ExternalProcessorServicer
from ext_proc.settings import Settings
from gateway import inner_tls
from gateway.catalog import Catalog
from gateway.service import SHUTDOWN_GRACE_SECONDS, GrpcHandle, GrpcService, GrpcSettings
from gateway.signals import run_until_signal

logger = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


class ManagedPolicy(ListPolicy, Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Service(GrpcHandle):
    """A running ext_proc server; ``stop()`` releases everything ``start_service`` made."""

    servicer: ExternalProcessorServicer
    _policy: ManagedPolicy | None
    _catalog: Catalog | None
    _stopped: bool = field(default=False)

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.rpc.drain(grace)
        if self._policy is not None:
            await self._policy.close()
        if self._catalog is not None:
            self._catalog.close()
        await self.rpc.close()


async def start_service(settings: Settings, policy: ManagedPolicy | None, *,
                        catalog: Catalog | None = None) -> Service:
    """Start serving on ``settings.listen`` (port 0 picks a free port; see ``Service.port``).

    ``catalog``: defaults to the one at ``settings.catalog_path`` (None there: no pinning).
    """
    if catalog is None and settings.catalog_path is not None:
        catalog = Catalog(settings.catalog_path)
    service: GrpcService | None = None
    try:
        inspector = Inspector(policy=policy, list_entrypoints=settings.list_entrypoints,
                              catalog=catalog, replacement=settings.replacement,
                              phone_region=settings.phone_region)
        service = await GrpcService.open(GrpcSettings(
            "ext_proc", SERVICE_NAME, settings.listen, metrics_host=settings.metrics_host,
            metrics_port_offset=settings.metrics_port_offset,
            otlp_endpoint=settings.otlp_endpoint, tls=inner_tls.files_from_env()))
        servicer = ExternalProcessorServicer(settings, inspector, tracing=service.tracing)
        service.register(
            lambda server: pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server))
        if policy is not None:
            await policy.start()
        await service.start()
        await service.set_serving()
    except BaseException:
        if service is not None:
            await service.close()
        if catalog is not None:
            catalog.close()
        raise
    logger.info("ext_proc serving on %s:%d (metrics on %s:%d, catalog %s, list filters %s, "
                "traces to %s)", settings.listen.host, service.port, service.metrics.host,
                service.metrics.port, settings.catalog_path, dict(settings.list_entrypoints),
                settings.otlp_endpoint if service.tracing else "nowhere")
    return Service(service, servicer, policy, catalog)


async def serve(settings: Settings, policy: ManagedPolicy | None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    service = await start_service(settings, policy)
    await run_until_signal(service.stop)
