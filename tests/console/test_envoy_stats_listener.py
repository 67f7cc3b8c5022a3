"""The overview's fallback to Envoy's stats-only listener (console.envoy_stats_url): a real aiohttp
server serving Envoy's /stats/prometheus text (a sample taken from a real Envoy) gives healthy /
total members per cluster, request and 5xx rates and p50 / p99 from the latency buckets; a listener
that is unreachable, too slow or too big shows "Envoy stats unavailable" with the reason."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ConfigError, parse_config
from gateway.console.app import make_app
from gateway.console.envoy_stats import (
    MAX_PROMETHEUS_BYTES,
    PROMETHEUS_FILTER,
    EnvoyAdmin,
    EnvoyStatsListener,
    TrafficSampler,
    overview,
    parse_prometheus,
)
from gateway.console.settings import ConsoleSettings
from gatewayctl.tokens import SigningKey
from tests.console.conftest import COOKIE, Console, console_settings, seed_catalog
from tests.ext_authz.conftest import JwksServer

# GET /stats/prometheus?filter=PROMETHEUS_FILTER of a real Envoy (1.x from the venv) with two
# clusters: mcp_files (one healthy member, 40 requests, all under 0.5 ms) and mcp_down (two members,
# both failing their health check, one 503).
SAMPLE = (Path(__file__).parent / "data" / "envoy_stats_prometheus.txt").read_text()


def _more_traffic(text: str) -> str:
    """The sample 10 s later: mcp_files 40 -> 60 requests, 5 of them 5xx, all the new ones
    between 5 and 10 ms."""
    text = text.replace('upstream_rq_total{envoy_cluster_name="mcp_files"} 40',
                        'upstream_rq_total{envoy_cluster_name="mcp_files"} 60')
    text = text.replace('# TYPE envoy_cluster_upstream_rq_xx counter\n',
                        '# TYPE envoy_cluster_upstream_rq_xx counter\n'
                        'envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",'
                        'envoy_cluster_name="mcp_files"} 5\n')

    def bump(m: re.Match[str]) -> str:
        le, count = m.group(1), float(m.group(2))
        return f'{m.group(0).rsplit(" ", 1)[0]} {int(count + (20 if le not in ("0.5", "1", "5") else 0))}'

    text = re.sub(r'envoy_cluster_upstream_rq_time_bucket\{envoy_cluster_name="mcp_files",le="([^"]+)"\} '
                  r'(\d+)', bump, text)
    return text.replace('upstream_rq_time_count{envoy_cluster_name="mcp_files"} 40',
                        'upstream_rq_time_count{envoy_cluster_name="mcp_files"} 60')


@dataclass
class StatsListener:
    """A real aiohttp server shaped like Envoy's stats listener, plus misbehaving routes."""

    server: TestServer
    text: str = SAMPLE
    filters: list[str] = field(default_factory=list)

    def url(self, path: str = "/stats/prometheus") -> str:
        return str(self.server.make_url(path))


@pytest.fixture
async def listener() -> AsyncIterator[StatsListener]:
    never = asyncio.Event()
    app = web.Application()
    holder: list[StatsListener] = []

    async def stats(request: web.Request) -> web.Response:
        holder[0].filters.append(request.query.get("filter", ""))
        return web.Response(text=holder[0].text, content_type="text/plain")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"# x\n" * (MAX_PROMETHEUS_BYTES // 4 + 1))

    async def slow(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app.router.add_get("/stats/prometheus", stats)
    app.router.add_get("/big/stats/prometheus", big)
    app.router.add_get("/slow/stats/prometheus", slow)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    holder.append(StatsListener(server))
    try:
        yield holder[0]
    finally:
        never.set()
        await server.close()


async def _closed_url() -> str:
    dead = TestServer(web.Application(), host="127.0.0.1", port=0)
    await dead.start_server()
    url = str(dead.make_url(""))
    await dead.close()
    return url


def test_parse_prometheus_reads_membership_requests_errors_and_buckets() -> None:
    """Envoy's Prometheus text gives each cluster's healthy / total members and each server's
    requests, 5xx answers and latency buckets."""
    clusters, traffic = parse_prometheus(SAMPLE)
    assert [(c.component, c.healthy, c.total, c.all_healthy) for c in clusters] == [
        ("down", 0, 2, False), ("files", 1, 1, True)]
    assert traffic["files"].total == 40 and traffic["files"].errors == 0
    assert traffic["down"].total == 2 and traffic["down"].errors == 1
    assert traffic["files"].buckets[0] == (0.5, 40) and traffic["files"].buckets[-1] == (float("inf"), 40)


def test_parse_prometheus_refuses_text_that_is_not_prometheus() -> None:
    """Malformed text is a ValueError (the overview shows it), not a crash."""
    with pytest.raises(ValueError, match="not Prometheus text"):
        parse_prometheus('envoy_cluster_membership_total{envoy_cluster_name="x" 1\n')


async def test_sampler_falls_back_to_the_stats_listener(listener: StatsListener) -> None:
    """With the admin interface unreachable, the sampler reads the stats listener (asking for the
    cluster stats only): rate, 5xx % and p50 / p99 over the interval between two samples."""
    now = [1000.0]
    async with aiohttp.ClientSession() as http:
        admin = EnvoyAdmin(await _closed_url(), http, timeout=1.0)
        stats = EnvoyStatsListener(listener.url(), http, timeout=1.0)
        sampler = TrafficSampler(admin, interval=5, keep=10, clock=lambda: now[0], stats=stats)
        await sampler.sample_once()
        listener.text = _more_traffic(SAMPLE)
        now[0] += 10
        await sampler.sample_once()
        ov = await overview(admin, sampler)
    assert listener.filters[0] == PROMETHEUS_FILTER
    assert ov.error is None and ov.source == "stats" and ov.envoy_ready
    assert {c.component: (c.healthy, c.total) for c in ov.clusters} == {"files": (1, 1), "down": (0, 2)}
    files = ov.current["files"]
    assert files["rps"] == 2.0  # 20 requests in 10 s
    assert files["error_pct"] == 25.0  # 5 of them 5xx
    # All 20 new requests took 5 to 10 ms: the interval's quantiles, not the cumulative ones
    # (where p50 is under 0.5 ms).
    assert files["p50_ms"] is not None and 5 < files["p50_ms"] <= 10
    assert files["p99_ms"] is not None and 5 < files["p99_ms"] <= 10


@pytest.mark.parametrize(("path", "reason"), [
    ("/big/stats/prometheus", f"exceeds {MAX_PROMETHEUS_BYTES} bytes"),
    ("/slow/stats/prometheus", "TimeoutError"),
    ("/missing/stats/prometheus", "answered 404"),
])
async def test_overview_names_why_the_stats_listener_fails(listener: StatsListener, path: str,
                                                           reason: str) -> None:
    """A stats listener answering too much, too late or not 200 leaves the overview with
    "Envoy stats unavailable" and the reason, within the timeout."""
    async with aiohttp.ClientSession() as http:
        admin = EnvoyAdmin(await _closed_url(), http, timeout=0.5)
        sampler = TrafficSampler(admin, interval=5, keep=10,
                                 stats=EnvoyStatsListener(listener.url(path), http, timeout=0.5))
        ov = await asyncio.wait_for(overview(admin, sampler), 10)
    assert ov.error is not None and ov.error.startswith("Envoy stats unavailable: admin interface: ")
    assert reason in ov.error and not ov.clusters and not ov.envoy_ready


async def _page(tmp_path: Path, jwks: JwksServer, signing_key: SigningKey, policy_copy: Path,
                stats_url: str) -> tuple[str, dict[str, object]]:
    settings = replace(console_settings(tmp_path, jwks.url, policy_dir=policy_copy),
                       envoy_stats_url=stats_url)
    seed_catalog(Path(settings.catalog_path))
    server = TestServer(make_app(settings), host="127.0.0.1", port=0)
    await server.start_server()
    http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
    try:
        console = Console(server, http, settings, signing_key)
        sid, _ = await console.sign_in(["admin"])
        headers = {"Cookie": f"{COOKIE}={sid}"}
        async with http.get(console.url("/console/overview"), headers=headers) as resp:
            assert resp.status == 200
            page = html.unescape(await resp.text())
        async with http.get(console.url("/console/api/overview"), headers=headers) as resp:
            data = await resp.json()
        return page, data
    finally:
        await http.close()
        await server.close()


async def test_overview_page_shows_cluster_health_from_the_stats_listener(
        tmp_path: Path, jwks: JwksServer, signing_key: SigningKey, policy_copy: Path,
        listener: StatsListener) -> None:
    """The console configured with the stats listener (its admin port unreachable) shows healthy /
    total members per cluster and says per-host health is not there."""
    page, data = await _page(tmp_path, jwks, signing_key, policy_copy, listener.url())
    assert 'id="clusters"' in page and "healthy / total members per cluster" in page
    assert re.search(r'data-component="files">.*?ok health">1 / 1<', page, re.S)
    assert re.search(r'data-component="down">.*?bad health">0 / 2<', page, re.S)
    assert "Envoy stats unavailable" not in page
    assert data["source"] == "stats"
    assert {"component": "files", "cluster": "mcp_files", "healthy": 1, "total": 1} in data["clusters"]  # type: ignore[operator]


async def test_overview_page_says_envoy_stats_unavailable_when_unreachable(
        tmp_path: Path, jwks: JwksServer, signing_key: SigningKey, policy_copy: Path) -> None:
    """Neither the admin interface nor the stats listener answering: the page says so, naming
    both and the listener's address."""
    url = await _closed_url() + "stats/prometheus"
    page, data = await _page(tmp_path, jwks, signing_key, policy_copy, url)
    assert "Envoy stats unavailable: admin interface: " in page
    assert f"stats listener {url}: " in page
    assert data["source"] == "stats" and data["clusters"] == []


def _cfg(console: dict[str, object], tmp_path: Path) -> ConsoleSettings:
    raw = {"public_url": "https://gw.example.test",
           "tls": {"cert_file": str(tmp_path / "t.pem"), "key_file": str(tmp_path / "t.key")},
           "issuers": [{"issuer": "https://idp.example.test", "jwks_url": "https://idp.example.test/jwks"}],
           "ext_authz": {"instances": [{"port": 1101}]}, "ext_proc": {"instances": [{"port": 1111}]},
           "servers": {"files": {"module": "mcp_servers.files", "instances": [{"port": 1201}]}},
           "catalog": {"path": str(tmp_path / "catalog.sqlite")}, "audit": {"dir": str(tmp_path / "audit")},
           "state_dir": str(tmp_path),
           "console": {"instances": [{"port": 1401}], **console}}
    return ConsoleSettings.from_config(parse_config(raw, base_dir=tmp_path))


def test_envoy_stats_url_is_validated(tmp_path: Path) -> None:
    """console.envoy_stats_url reaches the settings; anything but an http(s) URL of
    /stats/prometheus without query or credentials is refused naming the key."""
    assert _cfg({}, tmp_path).envoy_stats_url is None
    url = "http://envoy:9902/stats/prometheus"
    assert _cfg({"envoy_stats_url": url}, tmp_path).envoy_stats_url == url
    for bad in ("envoy:9902", "ftp://envoy/stats/prometheus", "http://envoy:9902/clusters",
                "http://envoy:9902/stats/prometheus?filter=x", "http://u:p@envoy/stats/prometheus", 9902):
        with pytest.raises(ConfigError, match="console.envoy_stats_url"):
            _cfg({"envoy_stats_url": bad}, tmp_path)
