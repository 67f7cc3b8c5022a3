"""Metrics: real /metrics endpoints over HTTP whose counters move with activity."""

from __future__ import annotations

import asyncio
import re

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.telemetry import metrics


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text exposition, 0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == want:
            return float(m.group(3))
    return 0.0


async def test_aiohttp_metrics_route_counters_move() -> None:
    """GET /metrics on an aiohttp app shows request, decision latency and tool-call series moving."""
    app = web.Application()
    metrics.add_metrics_route(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        before = await (await client.get("/metrics")).text()
        metrics.record_request("files", "tools/call", "read_file", "allow")
        metrics.record_request("files", "tools/call", "read_file", "allow")
        metrics.DECISION_LATENCY.labels("allow").observe(0.0002)
        metrics.record_tool_call("files", "read_file", "ok")
        resp = await client.get("/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        after = await resp.text()
    labels = {"server": "files", "method": "tools/call", "tool": "read_file", "decision": "allow"}
    assert sample(after, "mcp_gateway_requests_total", **labels) == sample(
        before, "mcp_gateway_requests_total", **labels) + 2
    assert sample(after, "mcp_gateway_decision_duration_seconds_bucket", decision="allow", le="0.00025") >= 1
    assert sample(after, "mcp_gateway_tool_calls_total", server="files", tool="read_file", outcome="ok") >= 1


async def test_openmetrics_negotiated() -> None:
    """A scraper asking for OpenMetrics gets it."""
    app = web.Application()
    metrics.add_metrics_route(app)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await resp.text()).rstrip().endswith("# EOF")


async def test_standalone_server_on_loopback_port_zero() -> None:
    """start_metrics_server binds 127.0.0.1 on a free port, serves counters, and stops cleanly."""
    server = metrics.start_metrics_server("127.0.0.1", 0)
    try:
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with aiohttp.ClientSession() as session:
            before = sample(await (await session.get(url)).text(), "mcp_gateway_jwks_fetches_total",
                            issuer="https://idp.test", outcome="ok")
            metrics.JWKS_FETCHES.labels("https://idp.test", "ok").inc()
            metrics.RATE_LIMIT_REJECTIONS.labels("user").inc()
            metrics.MASKED_VALUES.labels("email").inc(3)
            metrics.QUARANTINED_TOOLS.labels("files").set(2)
            text = await (await session.get(url)).text()
        after = sample(text, "mcp_gateway_jwks_fetches_total", issuer="https://idp.test", outcome="ok")
        assert after == before + 1
        assert sample(text, "mcp_gateway_rate_limit_rejections_total", scope="user") >= 1
        assert sample(text, "mcp_gateway_masked_values_total", type="email") >= 3
        assert sample(text, "mcp_gateway_quarantined_tools", server="files") == 2
    finally:
        await asyncio.to_thread(server.close)
    async with aiohttp.ClientSession() as session:
        try:
            await session.get(f"http://127.0.0.1:{server.port}/metrics")
            raise AssertionError("server still answering after close")
        except aiohttp.ClientConnectionError:
            pass


def test_bounded_labels_cap_cardinality() -> None:
    """Client-chosen label values are truncated and, past the cap, folded into __other__."""
    field = "test_field_cap"
    assert metrics.bounded(field, "x" * 500) == "x" * metrics.MAX_LABEL_LEN
    for i in range(metrics.MAX_DISTINCT_VALUES - 1):
        assert metrics.bounded(field, f"v{i}") == f"v{i}"
    assert metrics.bounded(field, "one-too-many") == metrics.OTHER
    assert metrics.bounded(field, "v0") == "v0"
    assert metrics.bounded(field, None) == ""
