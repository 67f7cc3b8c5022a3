"""One health check of one component: HTTP, gRPC health, or Envoy (admin ``/ready``, then
``/health`` through the TLS listener). Each check is bounded by PROBE_TIMEOUT_SECONDS."""

from __future__ import annotations

import http.client
import ssl
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from gatewayctl.devstack.plan import Component

PROBE_TIMEOUT_SECONDS = 1.0


def http_status(host: str, port: int, path: str, *, tls: ssl.SSLContext | None = None,
                timeout: float = PROBE_TIMEOUT_SECONDS) -> int:
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _grpc_serving(host: str, port: int, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    import grpc  # grpc starts threads: load it only to probe
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated stub: untyped methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def probe(component: Component, config: GatewayConfig, ca_file: Path | None) -> bool:
    """One health check of one component (bounded by PROBE_TIMEOUT_SECONDS)."""
    pr = component.probe
    try:
        if pr.kind == "grpc":
            return _grpc_serving(pr.host, pr.port)
        if pr.kind == "http":
            return http_status(pr.host, pr.port, pr.path) == 200
        # Envoy: admin /ready is LIVE only after every cluster finished its first health checks;
        # then /health through the TLS listener proves the listener and certificate work.
        if http_status(pr.host, pr.port, pr.path) != 200:
            return False
        if config.tls.client_ca_file is not None:
            return True  # the listener wants a client certificate the probe does not have
        ctx = ssl.create_default_context(cafile=str(ca_file)) if ca_file else \
            ssl._create_unverified_context()  # noqa: S323  (user CA unknown here; liveness only)
        host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
        return http_status(host, config.listen.port, "/health", tls=ctx) == 200
    except (OSError, http.client.HTTPException):
        return False
