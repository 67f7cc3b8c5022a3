"""Health, request rate, error rate and latency from Envoy's admin interface.

Envoy health-checks every instance of every cluster it routes to (ext_authz, ext_proc, the
aggregator, each MCP server), so ``/clusters`` is one view of every component's health, and
its per-cluster counters and latency histograms (``/stats``) give each server's traffic. A
sampler keeps the last minutes of counters in memory for the overview's charts."""

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


class EnvoyAdmin:
    """Reads Envoy's admin interface with a bounded timeout and answer size."""

    def __init__(self, base_url: str, http: aiohttp.ClientSession, *, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _get(self, path: str, params: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        async with self._http.get(self.base_url + path, params=params, timeout=self._timeout) as resp:
            body = await resp.content.read(MAX_ADMIN_BYTES + 1)
            if len(body) > MAX_ADMIN_BYTES:
                raise ValueError(f"Envoy's {path} answer exceeds {MAX_ADMIN_BYTES} bytes")
            return resp.status, body

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


class TrafficSampler:
    """The last ``keep`` samples of every server's counters, taken every ``interval`` seconds,
    turned into request rate, error rate and latency series for the charts."""

    def __init__(self, admin: EnvoyAdmin, *, interval: float, keep: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.admin = admin
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=keep)
        self._clock = clock

    async def sample_once(self) -> None:
        try:
            traffic = await self.admin.traffic()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            logger.debug("Envoy stats unavailable: %s", exc)
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
                rows["p50_ms"].append(now.p50_ms)
                rows["p99_ms"].append(now.p99_ms)
        for rows in out.values():
            for column in rows.values():
                column.extend([None] * (len(times) - len(column)))
        return times, out


async def overview(admin: EnvoyAdmin, sampler: TrafficSampler) -> Overview:
    """Every component's instances with Envoy's view of their health, and the traffic series."""
    try:
        ready = await admin.ready()
        instances = await admin.clusters()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return Overview(False, [], error=f"Envoy's admin interface does not answer: {exc}")
    times, series = sampler.series()
    current: dict[str, dict[str, float | None]] = {}
    for server, rows in series.items():
        current[server] = {k: v[-1] if v else None for k, v in rows.items()}
    return Overview(ready, instances, series=series, times=times, current=current)
