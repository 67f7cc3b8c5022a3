"""One health check of one component: HTTP, gRPC health, or Envoy (admin ``/ready``, then
``/health`` through the TLS listener). Each check is bounded by PROBE_TIMEOUT_SECONDS."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from gateway import inner_tls
from gateway.config import GatewayConfig
from gateway.inner_tls import TlsFiles
from gateway.upstream import ProbeFailed, UpstreamError, targets
from gateway.upstream import probe as upstream_probe
from gatewayctl.devstack.credentials import inner_client_context
from gatewayctl.devstack.plan import Component

PROBE_TIMEOUT_SECONDS = 1.0
# A remote server's handshake is three round trips over a network, maybe with TLS.
UPSTREAM_PROBE_TIMEOUT_SECONDS = 5.0


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


def _grpc_serving(host: str, port: int, timeout: float = PROBE_TIMEOUT_SECONDS, *,
                  tls: TlsFiles | None = None, tls_name: str = "") -> bool:
    import grpc  # grpc starts threads: load it only to probe
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is not None:
        # inner_tls: the gateway's client certificate; the server's must name tls_name.
        creds = grpc.ssl_channel_credentials(Path(tls.ca_file).read_bytes(),
                                             Path(tls.key_file).read_bytes(),
                                             Path(tls.cert_file).read_bytes())
        channel_ctx = grpc.secure_channel(f"{host}:{port}", creds,
                                          options=[("grpc.ssl_target_name_override", tls_name)])
    else:
        channel_ctx = grpc.insecure_channel(f"{host}:{port}")
    with channel_ctx as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # generated stub: untyped methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def upstream_problem(component: Component, config: GatewayConfig) -> str | None:
    """A url server endpoint's MCP-level check (``gateway.upstream.probe``, the kind its config
    names): None when healthy, else what it got."""
    server = config.server(component.probe.server)
    try:
        target = targets(server, os.environ)[component.instance]
    except UpstreamError as exc:
        return exc.message
    kind = "tcp" if server.health == "tcp" else server.health

    async def check() -> None:
        async with aiohttp.ClientSession() as http:
            await upstream_probe(http, target, kind, health_path=server.health_path,
                                 seconds=UPSTREAM_PROBE_TIMEOUT_SECONDS)

    try:
        asyncio.run(check())
    except ProbeFailed as exc:
        return exc.message
    return None


def probe(component: Component, config: GatewayConfig, ca_file: Path | None) -> bool:
    """One health check of one component (bounded by PROBE_TIMEOUT_SECONDS)."""
    pr = component.probe
    if pr.kind == "mcp":
        return upstream_problem(component, config) is None
    try:
        if pr.tls_name:
            # inner_tls: the component wants the gateway's client certificate.
            if pr.kind == "grpc":
                return _grpc_serving(pr.host, pr.port, tls=config.inner_tls.files(inner_tls.ENVOY),
                                     tls_name=pr.tls_name)
            return http_status(pr.host, pr.port, pr.path, tls=inner_client_context(config)) == 200
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


# ------------------------------------------------------------------------- Envoy's own view

# Envoy's host health flags as its admin interface reports them, in the words `status` prints.
_HOST_FLAGS = (
    ("failed_active_health_check", "failed health check"),
    ("failed_outlier_check", "ejected (outlier)"),
    ("failed_eds_health", "unhealthy (discovery)"),
    ("pending_active_hc", "first check pending"),
    ("pending_dynamic_removal", "being removed"),
    ("excluded_via_immediate_hc_fail", "excluded"),
)


def cluster_of(component: str, config: GatewayConfig) -> str | None:
    """The Envoy cluster that sends traffic to a component's instances (None: not routed)."""
    if component in ("ext_authz", "ext_proc", "aggregator", "console"):
        return component
    if any(s.name == component for s in config.servers):
        return f"mcp_{component}"
    return None


def envoy_view(config: GatewayConfig) -> dict[tuple[str, str], str] | None:
    """How the running Envoy sees each upstream host, by (cluster, "host:port"): "healthy", or
    the reasons it sends it nothing ("failed health check", "ejected (outlier)", ...), from the
    admin interface's /clusters. None when Envoy does not answer."""
    conn = http.client.HTTPConnection(config.admin.host, config.admin.port,
                                      timeout=PROBE_TIMEOUT_SECONDS)
    try:
        conn.request("GET", "/clusters?format=json")
        reply = conn.getresponse()
        if reply.status != 200:
            return None
        document = json.loads(reply.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    view: dict[tuple[str, str], str] = {}
    for cluster in document.get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            address = host.get("address", {}).get("socket_address", {})
            key = (cluster.get("name", ""), f"{address.get('address')}:{address.get('port_value')}")
            health = host.get("health_status", {})
            reasons = [words for flag, words in _HOST_FLAGS if health.get(flag)]
            if health.get("eds_health_status") not in (None, "HEALTHY", "UNKNOWN"):
                reasons.append(str(health["eds_health_status"]).lower())
            view[key] = ", ".join(reasons) or "healthy"
    return view
