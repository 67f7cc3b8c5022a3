"""Health, request rate, error rate and latency from Envoy's admin interface.

Envoy health-checks every instance of every cluster it routes to (ext_authz, ext_proc, the
aggregator, each MCP server), so ``/clusters`` is one view of every component's health, and
its per-cluster counters and latency histograms (``/stats``) give each server's traffic. A
sampler keeps the last minutes of counters in memory for the overview's charts.

Where the admin interface stays on Envoy's loopback (docker compose, Kubernetes), the overview
falls back to Envoy's stats-only listener (``console.envoy_stats_url``, serving
``/stats/prometheus``): health there is per cluster (healthy / total members, no per-host
reasons), traffic the same counters and the latency histogram's buckets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.console.service_metrics import quantile

logger = logging.getLogger(__name__)

SERVER_CLUSTER_PREFIX = "mcp_"
_FLAGS = (
    ("failed_active_health_check", "failed health check"),
    ("failed_outlier_check", "ejected (outlier)"),
    ("failed_eds_health", "unhealthy (discovery)"),
    ("pending_active_hc", "first check pending"),
    ("pending_dynamic_removal", "being removed"),
    ("excluded_via_immediate_hc_fail", "excluded"),
)
STAT_FILTER = r"^cluster\.mcp_[^.]+\.(upstream_rq_total|upstream_rq_5xx|upstream_rq_time)$"
MAX_ADMIN_BYTES = 8 * 1024 * 1024
# What the overview asks the stats listener for (Envoy's admin filter on the stats' own names).
PROMETHEUS_FILTER = (r"^cluster\.[^.]+\.(membership_healthy|membership_total|upstream_rq_total"
                     r"|upstream_rq_5xx|upstream_rq_time)$")
MAX_PROMETHEUS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Instance:
    component: str  # "ext_authz", "ext_proc", "aggregator", a server's name
    cluster: str
    address: str
    health: str  # "healthy", or why Envoy sends it nothing

    @property
    def healthy(self) -> bool:
        return self.health == "healthy"


def component_of(cluster: str) -> str:
    return cluster.removeprefix(SERVER_CLUSTER_PREFIX) if cluster.startswith(SERVER_CLUSTER_PREFIX) \
        else cluster


def parse_clusters(doc: Any) -> list[Instance]:
    """Every upstream host of ``/clusters?format=json`` with its health in words."""
    out: list[Instance] = []
    statuses = doc.get("cluster_statuses", []) if isinstance(doc, dict) else []
    for cluster in statuses if isinstance(statuses, list) else []:
        name = cluster.get("name") if isinstance(cluster, dict) else None
        if not isinstance(name, str):
            continue
        for host in cluster.get("host_statuses", []) or []:
            sock = host.get("address", {}).get("socket_address", {})
            address = f"{sock.get('address', '?')}:{sock.get('port_value', '?')}"
            health = host.get("health_status", {})
            reasons = [text for flag, text in _FLAGS if health.get(flag)]
            eds = health.get("eds_health_status", "HEALTHY")
            if eds not in ("HEALTHY", "UNKNOWN") and not reasons:
                reasons.append(str(eds).lower())
            out.append(Instance(component_of(name), name, address,
                                "healthy" if not reasons else ", ".join(reasons)))
    return out


@dataclass(slots=True)
class ServerTraffic:
    total: float = 0.0
    errors: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    # From /stats/prometheus: the latency histogram's cumulative buckets ((upper bound ms, count));
    # the sampler takes p50 / p99 from their increase between two samples.
    buckets: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterHealth:
    """One cluster's members as the stats listener reports them (no per-host health there)."""

    component: str
    cluster: str
    healthy: int
    total: int

    @property
    def all_healthy(self) -> bool:
        return self.total > 0 and self.healthy == self.total


def parse_prometheus(text: str) -> tuple[list[ClusterHealth], dict[str, ServerTraffic]]:
    """Every cluster's healthy / total members and each server's (``mcp_*``) requests, 5xx
    answers and latency buckets from Envoy's ``/stats/prometheus`` text."""
    healthy: dict[str, float] = {}
    total: dict[str, float] = {}
    traffic: dict[str, ServerTraffic] = {}
    buckets: dict[str, dict[float, float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises several kinds on malformed text
        raise ValueError(f"Envoy's /stats/prometheus is not Prometheus text: {exc}") from exc
    for family in families:
        for s in family.samples:
            cluster = s.labels.get("envoy_cluster_name")
            if not cluster:
                continue
            if s.name == "envoy_cluster_membership_healthy":
                healthy[cluster] = s.value
            elif s.name == "envoy_cluster_membership_total":
                total[cluster] = s.value
            elif not cluster.startswith(SERVER_CLUSTER_PREFIX):
                continue
            elif s.name == "envoy_cluster_upstream_rq_total":
                traffic.setdefault(component_of(cluster), ServerTraffic()).total = s.value
            # The parser names a counter's sample <family>_total (Envoy writes rq_xx bare).
            elif s.name in ("envoy_cluster_upstream_rq_xx", "envoy_cluster_upstream_rq_xx_total") \
                    and s.labels.get("envoy_response_code_class") == "5":
                traffic.setdefault(component_of(cluster), ServerTraffic()).errors = s.value
            elif s.name == "envoy_cluster_upstream_rq_time_bucket" and "le" in s.labels:
                traffic.setdefault(component_of(cluster), ServerTraffic())
                buckets.setdefault(component_of(cluster), {})[float(s.labels["le"])] = s.value
    for server, rows in buckets.items():
        traffic[server].buckets = tuple(sorted(rows.items()))
    clusters = [ClusterHealth(component_of(name), name, int(healthy.get(name, 0)), int(count))
                for name, count in sorted(total.items())]
    return clusters, traffic


def parse_stats(doc: Any) -> dict[str, ServerTraffic]:
    """Per server: upstream requests, 5xx answers (counters) and p50 / p99 latency (the last
    interval's quantiles, else the cumulative ones) from ``/stats?format=json``."""
    out: dict[str, ServerTraffic] = {}
    stats = doc.get("stats", []) if isinstance(doc, dict) else []
    for item in stats if isinstance(stats, list) else []:
        if not isinstance(item, dict):
            continue
        name = item.get("name")
        if isinstance(name, str) and name.startswith("cluster." + SERVER_CLUSTER_PREFIX):
            _, cluster, stat = name.split(".", 2)
            value = item.get("value")
            if not isinstance(value, int | float):
                continue
            traffic = out.setdefault(component_of(cluster), ServerTraffic())
            if stat == "upstream_rq_total":
                traffic.total = float(value)
            elif stat == "upstream_rq_5xx":
                traffic.errors = float(value)
        histograms = item.get("histograms")
        if isinstance(histograms, dict):
            _quantiles(histograms, out)
    return out


def _quantiles(histograms: dict[str, Any], out: dict[str, ServerTraffic]) -> None:
    supported = histograms.get("supported_quantiles") or []
    try:
        i50, i99 = supported.index(50), supported.index(99)
    except ValueError:
        return
    for q in histograms.get("computed_quantiles") or []:
        name = q.get("name", "")
        if not (isinstance(name, str) and name.startswith("cluster." + SERVER_CLUSTER_PREFIX)
                and name.endswith(".upstream_rq_time")):
            continue
        values = q.get("values") or []
        if len(values) <= max(i50, i99):
            continue
        traffic = out.setdefault(component_of(name.split(".")[1]), ServerTraffic())

        def pick(v: Mapping[str, Any]) -> float | None:
            x = v.get("interval")
            if x is None:
                x = v.get("cumulative")
            return float(x) if isinstance(x, int | float) else None

        traffic.p50_ms, traffic.p99_ms = pick(values[i50]), pick(values[i99])


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    servers: dict[str, ServerTraffic]


@dataclass(slots=True)
class Overview:
    envoy_ready: bool
    instances: list[Instance]
    error: str | None = None
    series: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    current: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # "admin" (per-host health in instances) or "stats" (the stats listener: per-cluster
    # health in clusters).
    source: str = "admin"
    clusters: list[ClusterHealth] = field(default_factory=list)


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise ValueError(f"{what} exceeds {cap} bytes")
    return bytes(body)


class EnvoyAdmin:
    """Reads Envoy's admin interface with a bounded timeout and answer size."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        async with self._http.get(self.base_url + path, params=params, timeout=self._timeout) as resp:
            return resp.status, await _read_capped(resp, MAX_ADMIN_BYTES, f"Envoy's {path}")

    async def ready(self) -> bool:
        status, _ = await self._get("/ready")
        return status == 200

    async def clusters(self) -> list[Instance]:
        status, body = await self._get("/clusters", {"format": "json"})
        if status != 200:
            raise ValueError(f"Envoy's /clusters answered {status}")
        return parse_clusters(orjson.loads(body))

    async def traffic(self) -> dict[str, ServerTraffic]:
        status, body = await self._get("/stats", {"format": "json", "filter": STAT_FILTER})
        if status != 200:
            raise ValueError(f"Envoy's /stats answered {status}")
        return parse_stats(orjson.loads(body))


class EnvoyStatsListener:
    """Reads Envoy's stats-only listener (``GET /stats/prometheus``) with a bounded timeout and
    answer size, asking only for the cluster stats the overview shows."""

    def __init__(self, url: str, http: aiohttp.ClientSession, *, timeout: float) -> None:
        self.url = url
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def read(self) -> tuple[list[ClusterHealth], dict[str, ServerTraffic]]:
        async with self._http.get(self.url, params={"filter": PROMETHEUS_FILTER},
                                  timeout=self._timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"answered {resp.status}")
            body = await _read_capped(resp, MAX_PROMETHEUS_BYTES, "the answer")
        return parse_prometheus(body.decode("utf-8", "replace"))


_READ_ERRORS = (aiohttp.ClientError, TimeoutError, ValueError)


class TrafficSampler:
    """The last ``keep`` samples of every server's counters, taken every ``interval`` seconds,
    turned into request rate, error rate and latency series for the charts."""

    def __init__(self, admin: EnvoyAdmin, *, interval: float, keep: int,
                 clock: Callable[[], float] = time.time,
                 stats: EnvoyStatsListener | None = None) -> None:
        self.admin = admin
        self.stats = stats
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=keep)
        self._clock = clock

    async def sample_once(self) -> None:
        try:
            traffic = await self.admin.traffic()
        except _READ_ERRORS as exc:
            if self.stats is None:
                logger.debug("Envoy stats unavailable: %s", exc)
                return
            try:
                _, traffic = await self.stats.read()
            except _READ_ERRORS as exc2:
                logger.debug("Envoy stats unavailable: %s; %s", exc, exc2)
                return
        self.samples.append(Sample(self._clock(), traffic))

    async def run(self) -> None:
        while True:
            await self.sample_once()
            await asyncio.sleep(self.interval)

    def series(self) -> tuple[list[float], dict[str, dict[str, list[float | None]]]]:
        """(sample times, {server: {"rps", "error_pct", "p50_ms", "p99_ms"}}) between samples."""
        samples = list(self.samples)
        times: list[float] = []
        out: dict[str, dict[str, list[float | None]]] = {}
        for prev, cur in zip(samples, samples[1:], strict=False):
            dt = cur.at - prev.at
            if dt <= 0:
                continue
            times.append(cur.at)
            n = len(times) - 1
            for server, now in cur.servers.items():
                before = prev.servers.get(server, ServerTraffic())
                rows = out.setdefault(server, {"rps": [], "error_pct": [], "p50_ms": [], "p99_ms": []})
                for column in rows.values():
                    column.extend([None] * (n - len(column)))
                requests = max(now.total - before.total, 0.0)
                errors = max(now.errors - before.errors, 0.0)
                rows["rps"].append(round(requests / dt, 3))
                rows["error_pct"].append(round(100 * errors / requests, 2) if requests else 0.0)
                p50, p99 = now.p50_ms, now.p99_ms
                if now.buckets:
                    window = _increase(now.buckets, before.buckets)
                    p50, p99 = _round(quantile(0.5, window)), _round(quantile(0.99, window))
                rows["p50_ms"].append(p50)
                rows["p99_ms"].append(p99)
        for rows in out.values():
            for column in rows.values():
                column.extend([None] * (len(times) - len(column)))
        return times, out


def _increase(cur: tuple[tuple[float, float], ...],
              prev: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    """The buckets' counts over the interval (the cumulative ones on a first sample, other
    bounds or a counter reset)."""
    if [b for b, _ in cur] != [b for b, _ in prev]:
        return cur
    rows = tuple((b, c - p) for (b, c), (_, p) in zip(cur, prev, strict=True))
    return cur if any(c < 0 for _, c in rows) else rows


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__  # a timeout has no message


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)


async def overview(admin: EnvoyAdmin, sampler: TrafficSampler) -> Overview:
    """Every component's instances with Envoy's view of their health, and the traffic series;
    per-cluster health from the stats listener when the admin interface does not answer."""
    clusters: list[ClusterHealth] = []
    try:
        ready = await admin.ready()
        instances = await admin.clusters()
        source = "admin"
    except _READ_ERRORS as exc:
        if sampler.stats is None:
            return Overview(False, [], error=f"Envoy's admin interface does not answer: {exc}")
        try:
            clusters, _ = await sampler.stats.read()
        except _READ_ERRORS as exc2:
            return Overview(False, [], source="stats",
                            error=f"Envoy stats unavailable: admin interface: {_why(exc)}; "
                                  f"stats listener {sampler.stats.url}: {_why(exc2)}")
        # The stats listener answers only while Envoy serves; its /ready is on the admin port.
        ready, instances, source = True, [], "stats"
    times, series = sampler.series()
    current: dict[str, dict[str, float | None]] = {}
    for server, rows in series.items():
        current[server] = {k: v[-1] if v else None for k, v in rows.items()}
    return Overview(ready, instances, series=series, times=times, current=current, source=source,
                    clusters=clusters)
