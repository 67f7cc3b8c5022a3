"""Prometheus metrics of the gateway, defined in one place with stable label sets.

Each Python process (ext_authz, ext_proc, every MCP server instance) serves its own ``/metrics``:
aiohttp services via :func:`add_metrics_route`, gRPC services via :func:`start_metrics_server`.
Prometheus scrapes every instance and aggregates; prometheus_client's multiprocess mode is not
used (no shared ``PROMETHEUS_MULTIPROC_DIR``), so scale-out means more scrape targets, not forks.

Label values that come from clients (tool names, server names) are passed through
:func:`bounded` so a client inventing tool names cannot grow the series count without limit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, start_http_server

NAMESPACE = "mcp_gateway"

# Decision latency is a Python ext_authz hop: tens of microseconds for a cached JWT + Rego query,
# milliseconds when a JWKS or Redis round trip is involved.
DECISION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)
# Audit commits are an fsync: ~0.1 ms on tmpfs-like storage up to tens of ms on busy disks.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

OTHER = "__other__"
MAX_LABEL_LEN = 128
MAX_DISTINCT_VALUES = 1000

REQUESTS = Counter(
    "requests", "MCP requests seen by the gateway, by server, JSON-RPC method, tool and decision.",
    ["server", "method", "tool", "decision"], namespace=NAMESPACE,
)
DECISION_LATENCY = Histogram(
    "decision_duration_seconds", "Time to reach an authorization decision, by decision.",
    ["decision"], namespace=NAMESPACE, buckets=DECISION_BUCKETS,
)
JWKS_FETCHES = Counter(
    "jwks_fetches", "JWKS fetches by issuer and outcome (ok, http_error, timeout, invalid, ...).",
    ["issuer", "outcome"], namespace=NAMESPACE,
)
RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections", "Requests rejected by a rate limit, by scope (user, tool, tenant, ...).",
    ["scope"], namespace=NAMESPACE,
)
MASKED_VALUES = Counter(
    "masked_values", "Values masked in responses, by type (email, credit_card, iban, ...).",
    ["type"], namespace=NAMESPACE,
)
QUARANTINED_TOOLS = Gauge(
    "quarantined_tools", "Tools currently quarantined (definition changed since approval), by server.",
    ["server"], namespace=NAMESPACE,
)
TOOL_CALLS = Counter(
    "tool_calls", "tools/call results by server, tool and outcome (ok, error, timeout, ...).",
    ["server", "tool", "outcome"], namespace=NAMESPACE,
)
EXT_PROC_STREAMS = Counter(
    "ext_proc_streams", "ext_proc streams (one per inspected answer) by outcome: passed, filtered, "
    "masked, withheld (an inspection error: the answer never reached the client), cancelled.",
    ["outcome"], namespace=NAMESPACE,
)
EXT_PROC_FAILURES = Counter(
    "ext_proc_failures", "Answers ext_proc withheld, by error code (inspection_timeout, ...).",
    ["code"], namespace=NAMESPACE,
)
EXT_PROC_BODY_LATENCY = Histogram(
    "ext_proc_body_duration_seconds", "Time to inspect one response body message (a JSON answer "
    "or one SSE chunk).", namespace=NAMESPACE, buckets=DECISION_BUCKETS,
)
AUDIT_ENTRIES = Counter(
    "audit_entries", "Audit entries by outcome (written, failed, rejected).",
    ["outcome"], namespace=NAMESPACE,
)
AUDIT_COMMIT_LATENCY = Histogram(
    "audit_commit_duration_seconds", "Time to write and fsync one audit batch.",
    namespace=NAMESPACE, buckets=COMMIT_BUCKETS,
)

_seen: dict[str, set[str]] = {}
_seen_lock = threading.Lock()


def bounded(field: str, value: str | None) -> str:
    """A label value for ``field``, truncated and capped at MAX_DISTINCT_VALUES distinct values.

    Once a field has that many distinct values, new ones map to ``__other__``; values already
    seen keep their own series.
    """
    if value is None:
        return ""
    value = value[:MAX_LABEL_LEN]
    with _seen_lock:
        seen = _seen.setdefault(field, set())
        if value in seen:
            return value
        if len(seen) >= MAX_DISTINCT_VALUES:
            return OTHER
        seen.add(value)
        return value


def record_request(server: str, method: str, tool: str | None, decision: str) -> None:
    """Count one MCP request with bounded label values."""
    REQUESTS.labels(bounded("server", server), bounded("method", method), bounded("tool", tool),
                    decision).inc()


def record_tool_call(server: str, tool: str, outcome: str) -> None:
    """Count one tools/call result with bounded label values."""
    TOOL_CALLS.labels(bounded("server", server), bounded("tool", tool), outcome).inc()


METRICS_KEY = web.AppKey("gateway_metrics_registry", CollectorRegistry)


async def _metrics_handler(request: web.Request) -> web.Response:
    registry = request.app[METRICS_KEY]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


def add_metrics_route(app: web.Application, path: str = "/metrics",
                      registry: CollectorRegistry = REGISTRY) -> None:
    """Serve this process's metrics at ``path`` of an aiohttp app (text or OpenMetrics)."""
    app[METRICS_KEY] = registry
    app.router.add_get(path, _metrics_handler)


@dataclass
class MetricsServer:
    """A running standalone /metrics server; :meth:`close` stops it and frees the port."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str = "127.0.0.1", port: int = 0,
                         registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Start a tiny HTTP server (daemon thread) serving /metrics, for gRPC-only services.

    Binds 127.0.0.1 by default; port 0 picks a free port, read it back from ``.port``.
    """
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host=host, port=int(server.server_address[1]), _server=server, _thread=thread)
