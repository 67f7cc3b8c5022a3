"""The overview's view of the services' own /metrics: real aiohttp services serving Prometheus
text through the project's metrics route, scraped with bounds (timeout, size), rates and
p50 / p99 between two scrapes, and shown on the overview page and its feed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.config import parse_config
from gateway.console.app import make_app
from gateway.console.service_metrics import (
    MetricsTarget,
    ServiceMetrics,
    metrics_targets,
    quantile,
    read_text,
)
from gateway.telemetry.metrics import DECISION_BUCKETS, add_metrics_route
from gatewayctl.tokens import SigningKey
from tests.console.conftest import COOKIE, Console, console_settings, seed_catalog
from tests.ext_authz.conftest import JwksServer

DEADLINE_SECONDS = 15.0


@dataclass
class FakeAuthz:
    """A real aiohttp app serving ext_authz's metric families from its own registry."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("/metrics"))


@pytest.fixture
async def authz_metrics() -> AsyncIterator[FakeAuthz]:
    registry = CollectorRegistry()
    requests = Counter("requests", "MCP requests", ["server", "method", "tool", "decision"],
                       namespace="mcp_gateway", registry=registry)
    latency = Histogram("decision_duration_seconds", "decision time", ["decision"],
                        namespace="mcp_gateway", buckets=DECISION_BUCKETS, registry=registry)
    app = web.Application()
    add_metrics_route(app, registry=registry)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield FakeAuthz(registry, requests, latency, server)
    finally:
        await server.close()


@pytest.fixture
async def odd_service() -> AsyncIterator[TestServer]:
    """/big answers more than the cap, /fail answers 500, /slow never answers in time."""
    never = asyncio.Event()

    async def big(request: web.Request) -> web.Response:
        return web.Response(text="# x\n" * (300 * 1024))

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def slow(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/big", big)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield server
    finally:
        never.set()
        await server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_read_text_sums_the_figures_of_each_kind() -> None:
    """ext_authz's allowed / denied counts and decision latency buckets, ext_proc's inspections
    and errors, a server's tool calls by outcome, read with prometheus_client's parser."""
    text = (
        '# TYPE mcp_gateway_requests_total counter\n'
        'mcp_gateway_requests_total{server="files",method="tools/call",tool="a",decision="allow"} 3\n'
        'mcp_gateway_requests_total{server="files",method="tools/call",tool="b",decision="role_denied"} 2\n'
        'mcp_gateway_requests_total{server="db",method="tools/call",tool="c",decision="allow"} 4\n'
        '# TYPE mcp_gateway_decision_duration_seconds histogram\n'
        'mcp_gateway_decision_duration_seconds_bucket{decision="allow",le="0.001"} 6\n'
        'mcp_gateway_decision_duration_seconds_bucket{decision="allow",le="+Inf"} 7\n'
        'mcp_gateway_decision_duration_seconds_bucket{decision="deny",le="0.001"} 1\n'
        'mcp_gateway_decision_duration_seconds_bucket{decision="deny",le="+Inf"} 2\n'
        'mcp_gateway_decision_duration_seconds_count{decision="allow"} 7\n'
        'mcp_gateway_decision_duration_seconds_sum{decision="allow"} 0.01\n'
        '# TYPE mcp_gateway_tool_calls_total counter\n'
        'mcp_gateway_tool_calls_total{server="files",tool="a",outcome="ok"} 5\n'
        'mcp_gateway_tool_calls_total{server="files",tool="a",outcome="timeout"} 1\n'
        '# TYPE mcp_gateway_ext_proc_streams_total counter\n'
        'mcp_gateway_ext_proc_streams_total{outcome="passed"} 8\n'
        'mcp_gateway_ext_proc_streams_total{outcome="masked"} 1\n'
        '# TYPE mcp_gateway_ext_proc_failures_total counter\n'
        'mcp_gateway_ext_proc_failures_total{code="inspection_timeout"} 2\n')
    authz = read_text("ext_authz", text)
    assert authz.counts == {"allowed": 7.0, "denied": 2.0}
    assert authz.buckets == ((0.001, 7.0), (float("inf"), 9.0))
    assert read_text("server", text).counts == {"calls_ok": 5.0, "calls_failed": 1.0}
    assert read_text("ext_proc", text).counts == {"inspections": 9.0, "errors": 2.0}


def test_quantile_interpolates_inside_the_bucket() -> None:
    """p50 / p99 as Prometheus's histogram_quantile: linear inside the bucket, the last finite
    bound when the rank falls in +Inf, None without observations."""
    buckets = ((0.001, 50.0), (0.01, 100.0), (float("inf"), 100.0))
    assert quantile(0.5, buckets) == pytest.approx(0.001)
    assert quantile(0.99, buckets) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert quantile(0.99, ((0.001, 1.0), (float("inf"), 10.0))) == pytest.approx(0.001)
    assert quantile(0.5, ((0.001, 0.0), (float("inf"), 0.0))) is None


async def test_rates_and_latency_between_two_scrapes(authz_metrics: FakeAuthz) -> None:
    """Two scrapes of a real /metrics ten seconds apart: allowed and denied per second and the
    p50 / p99 of the decisions made in between (not of the earlier ones)."""
    clock = Clock()
    authz_metrics.latency.labels("allow").observe(0.09)  # before: must not count in the interval
    async with aiohttp.ClientSession() as http:
        # The same answer read as a server's: no latency histogram of its kind in it.
        sm = ServiceMetrics([MetricsTarget("ext_authz", "ext_authz", authz_metrics.url),
                             MetricsTarget("files", "server", authz_metrics.url)], http,
                            interval=5, keep=10, clock=clock)
        await sm.scrape_once()
        first, _ = sm.views()
        assert first.up and first.rates == {"allowed": None, "denied": None}
        for _ in range(20):
            authz_metrics.requests.labels("files", "tools/call", "a", "allow").inc()
            authz_metrics.latency.labels("allow").observe(0.0003)
        for _ in range(5):
            authz_metrics.requests.labels("files", "tools/call", "a", "role_denied").inc()
            authz_metrics.latency.labels("deny").observe(0.0003)
        clock.now += 10
        await sm.scrape_once()
    view, server = sm.views()
    assert view.up and view.error is None
    assert view.rates == {"allowed": 2.0, "denied": 0.5}
    assert server.up and server.rates == {"calls_ok": 0.0, "calls_failed": 0.0}
    assert server.p50_ms is None and server.p99_ms is None
    assert view.p50_ms is not None and 0.25 <= view.p50_ms <= 0.5
    assert view.p99_ms is not None and view.p99_ms <= 0.5


async def test_a_service_that_fails_is_down_with_the_reason(odd_service: TestServer) -> None:
    """Unreachable, a 500, an answer over 1 MiB and one slower than the timeout: each is down
    with its reason, and one scrape round stays bounded by the timeout."""
    dead = TestServer(web.Application(), host="127.0.0.1", port=0)
    await dead.start_server()
    dead_url = str(dead.make_url("/metrics"))
    await dead.close()
    targets = [MetricsTarget("gone", "server", dead_url),
               MetricsTarget("fail", "server", str(odd_service.make_url("/fail"))),
               MetricsTarget("big", "server", str(odd_service.make_url("/big"))),
               MetricsTarget("slow", "server", str(odd_service.make_url("/slow")))]
    async with aiohttp.ClientSession() as http:
        sm = ServiceMetrics(targets, http, interval=5, keep=10, timeout=0.5)
        started = time.monotonic()
        await sm.scrape_once()
        assert time.monotonic() - started < DEADLINE_SECONDS
    views = {v.component: v for v in sm.views()}
    assert not any(v.up for v in views.values())
    assert views["fail"].error == "answered 500"
    assert views["big"].error is not None and "exceeds" in views["big"].error
    assert views["slow"].error == "timed out"
    assert views["gone"].error is not None


def test_targets_follow_where_each_service_serves_metrics(tmp_path: Path) -> None:
    """ext_authz / ext_proc on their port + telemetry.metrics_port_offset over HTTP, module and
    command servers and the aggregator on their own port, over HTTPS with the certificate's name
    under inner_tls; url servers are not scraped."""
    raw: dict[str, Any] = {
        "public_url": "https://gw.example.test",
        "tls": {"cert_file": str(tmp_path / "t.pem"), "key_file": str(tmp_path / "t.key")},
        "ext_authz": {"instances": [{"port": 1101}]}, "ext_proc": {"instances": [{"port": 1111}]},
        "telemetry": {"metrics_port_offset": 500},
        "servers": {"files": {"module": "mcp_servers.files", "instances": [{"port": 1201}, {"port": 1202}]},
                    "far": {"url": "https://far.example.test/mcp"}},
        "inner_tls": {"enabled": True},
        "aggregate": {"instances": [{"port": 1301}], "inner_listener": {"port": 1302}},
        "secrets": ["MCP_GATEWAY_AGGREGATE_KEYS"],
        "issuers": [{"issuer": "https://idp.example.test", "jwks_url": "https://idp.example.test/jwks"}],
        "state_dir": str(tmp_path),
    }
    targets = metrics_targets(parse_config(raw, base_dir=tmp_path))
    by = {(t.component, t.url): t for t in targets}
    assert ("ext_authz", "http://127.0.0.1:1601/metrics") in by
    assert ("ext_proc", "http://127.0.0.1:1611/metrics") in by
    files = by[("files", "https://127.0.0.1:1202/metrics")]
    assert files.tls_name == "server-files.mcp-gateway.internal"
    assert not any(t.component == "far" for t in targets)
    agg = [t for t in targets if t.kind == "aggregator"]
    assert agg and all(t.url.startswith("https://") and t.tls_name == "aggregator.mcp-gateway.internal"
                       for t in agg)


async def _poll(http: aiohttp.ClientSession, url: str, sid: str,
                done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        async with http.get(url, headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
        if done(data) or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.05)


async def test_the_overview_shows_each_service_up_or_down(
        tmp_path: Path, jwks: JwksServer, signing_key: SigningKey, policy_copy: Path,
        authz_metrics: FakeAuthz) -> None:
    """The console scrapes its targets in the background: the overview's feed and page show the
    reachable ext_authz up with its figures and an unreachable server down."""
    dead = TestServer(web.Application(), host="127.0.0.1", port=0)
    await dead.start_server()
    dead_url = str(dead.make_url("/metrics"))
    await dead.close()
    settings = replace(console_settings(tmp_path, jwks.url, policy_dir=policy_copy),
                       metrics_targets=(MetricsTarget("ext_authz", "ext_authz", authz_metrics.url),
                                        MetricsTarget("files", "server", dead_url)))
    seed_catalog(Path(settings.catalog_path))
    server = TestServer(make_app(settings), host="127.0.0.1", port=0)
    await server.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        console = Console(server, http, settings, signing_key)
        sid, _ = await console.sign_in(["admin"])
        data = await _poll(http, console.url("/console/api/overview"), sid,
                           lambda d: len([s for s in d["services"] if s["error"] != "not scraped yet"]) == 2)
        services = {s["component"]: s for s in data["services"]}
        assert services["ext_authz"]["up"] is True
        assert set(services["ext_authz"]["rates"]) == {"allowed", "denied"}
        assert services["files"]["up"] is False
        async with http.get(console.url("/console/overview"), headers={"Cookie": f"{COOKIE}={sid}"}) as resp:
            page = await resp.text()
        assert 'id="services"' in page and authz_metrics.url in page and "down: " in page
    finally:
        await http.close()
        await server.close()
