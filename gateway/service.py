"""The life cycle every gateway gRPC service shares: a grpc.aio server with the standard health
service, Prometheus /metrics beside it, OTLP tracing, and a graceful stop on SIGINT/SIGTERM.

    grpc = await GrpcService.open(GrpcSettings("ext_proc", SERVICE_NAME, listen, ...))
    try:
        grpc.register(lambda server: add_XServicer_to_server(servicer, server))
        await grpc.start()          # health still NOT_SERVING: warm up, then
        await grpc.set_serving()
    except BaseException:
        await grpc.close()
        raise
    ...
    await grpc.drain()  # health NOT_SERVING, in-flight calls finish (grace); then own resources
    await grpc.close()  # then /metrics, then the last spans are flushed

``async with await GrpcService.open(...) as grpc:`` does ``stop()`` (drain + close) on exit.
A service's own running handle subclasses :class:`GrpcHandle` to expose ``port``, ``metrics``...
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.config import Instance
from gateway.inner_peers import PeerInterceptor
from gateway.inner_tls import ENVOY_ONLY, PeerPolicy, TlsFiles, grpc_server_credentials
from gateway.telemetry import setup_tracing, shutdown_tracing, start_metrics_server
from gateway.telemetry.metrics import MetricsServer

SHUTDOWN_GRACE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class GrpcSettings:
    """What the shared part of a gRPC service needs; each service maps its own settings here."""

    name: str  # the service name in traces ("ext_authz")
    health_name: str  # the gRPC service whose health is reported, besides the server's ("")
    listen: Instance  # port 0 picks a free port
    metrics_host: str = "127.0.0.1"
    # A fixed port pair in deployments (Prometheus targets are static); any free one on port 0.
    metrics_port_offset: int = 1000
    otlp_endpoint: str | None = None  # None: tracing off
    # inner_tls: serve TLS only, requiring the gateway's client certificate (None: plain text).
    tls: TlsFiles | None = None
    # ... and accepting only these inner identities' certificates (gateway.inner_peers).
    peers: frozenset[str] = ENVOY_ONLY


class GrpcService:
    """A bound grpc.aio server with health, /metrics and tracing; see the module docstring."""

    def __init__(self, settings: GrpcSettings, server: grpc.aio.Server, port: int,
                 health_servicer: health.aio.HealthServicer, metrics: MetricsServer,
                 tracing: bool) -> None:
        self.settings = settings
        self.server = server
        self.port = port
        self.health = health_servicer
        self.metrics = metrics
        self.tracing = tracing
        self._started = False
        self._server_stopped = False
        self._closed = False

    @classmethod
    async def open(cls, settings: GrpcSettings) -> GrpcService:
        """Bind the port and start /metrics and tracing; health answers NOT_SERVING until
        :meth:`set_serving`. Raises OSError when the port cannot be bound."""
        health_servicer = health.aio.HealthServicer()
        # Not serving until the service says it is warm.
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(settings.health_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        peers = (PeerPolicy(settings.tls.cert_file, settings.peers)
                 if settings.tls is not None else None)
        # so_reuseport off: a second instance on a taken port must fail, not silently share it.
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)],
            interceptors=[PeerInterceptor(peers, settings.name)] if peers is not None else None)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        listen = settings.listen
        address = f"{listen.host}:{listen.port}"
        port = (server.add_secure_port(address, grpc_server_credentials(settings.tls, peers))
                if settings.tls is not None else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot listen on {listen.host}:{listen.port}")
        metrics, tracing = start_observability(settings, port)
        return cls(settings, server, port, health_servicer, metrics, tracing)

    def register(self, add: Callable[[grpc.aio.Server], None]) -> None:
        """Add a servicer, e.g. ``lambda s: add_AuthorizationServicer_to_server(servicer, s)``."""
        add(self.server)

    async def start(self) -> None:
        await self.server.start()
        self._started = True

    async def set_serving(self) -> None:
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(self.settings.health_name, health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        """Report NOT_SERVING, refuse new calls and give those in flight ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self._stop_server(grace)

    async def close(self) -> None:
        """Stop at once whatever :meth:`drain` left running, then /metrics, then flush spans."""
        if self._closed:
            return
        self._closed = True
        await self._stop_server(None)
        await stop_observability(self.metrics, self.tracing)

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.drain(grace)
        await self.close()

    async def _stop_server(self, grace: float | None) -> None:
        if self._started and not self._server_stopped:
            self._server_stopped = True
            await self.server.stop(grace)

    async def __aenter__(self) -> GrpcService:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def start_observability(settings: GrpcSettings, port: int) -> tuple[MetricsServer, bool]:
    """/metrics on ``port`` + the offset (any free port when the service listens on port 0) and
    tracing; returns the metrics server and whether tracing is on. Any transport's front uses it."""
    metrics_port = port + settings.metrics_port_offset if settings.listen.port else 0
    metrics = start_metrics_server(settings.metrics_host, metrics_port)
    try:
        tracing = setup_tracing(settings.name, settings.otlp_endpoint)
    except BaseException:
        metrics.close()
        raise
    return metrics, tracing


async def stop_observability(metrics: MetricsServer, tracing: bool) -> None:
    """Stop /metrics, then flush the spans still batched (when tracing is on)."""
    await asyncio.to_thread(metrics.close)
    if tracing:
        await asyncio.to_thread(shutdown_tracing)


@dataclass
class GrpcHandle:
    """Base of a service's running handle: the shared parts under the names callers use."""

    rpc: GrpcService

    @property
    def server(self) -> grpc.aio.Server:
        return self.rpc.server

    @property
    def port(self) -> int:
        return self.rpc.port

    @property
    def health(self) -> health.aio.HealthServicer:
        return self.rpc.health

    @property
    def metrics(self) -> MetricsServer:
        return self.rpc.metrics
