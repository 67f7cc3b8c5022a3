"""The services' own Prometheus ``/metrics`` on the overview: ext_authz and ext_proc (their
metrics port, ``telemetry.metrics_port_offset`` above the service's), every MCP server built on
``mcp_servers.core`` and every bridge (their own port), the aggregator (its own port).

A sampler scrapes every target concurrently every few seconds (1 s timeout and 1 MiB per
answer), parses the text with prometheus_client's parser and keeps the last minutes per target:
up or down, and the figures that matter for its kind as rates between the last two scrapes,
with p50 / p99 from the latency histogram's buckets over the same interval. Under inner_tls the
console presents its own certificate; the servers and the aggregator admit it on GET /metrics
only (``gateway.inner_tls.METRICS_READERS``)."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway import inner_tls
from gateway.config import GatewayConfig

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_SECONDS = 1.0
MAX_METRICS_BYTES = 1024 * 1024
MAX_TARGETS = 256  # scraped at most (a config naming more: the first ones, the page says so)
CONCURRENCY = 16

NS = "mcp_gateway_"
# What the overview shows per kind: (figure, metric family, label, predicate on the label's value)
# counted as a rate, and the latency histogram's family.
_COUNTS: dict[str, tuple[tuple[str, str, str | None, Callable[[str], bool]], ...]] = {
    "ext_authz": (("allowed", NS + "requests", "decision", lambda v: v == "allow"),
                  ("denied", NS + "requests", "decision", lambda v: v != "allow")),
    "ext_proc": (("inspections", NS + "ext_proc_streams", None, lambda v: True),
                 ("errors", NS + "ext_proc_failures", None, lambda v: True)),
    "server": (("calls_ok", NS + "tool_calls", "outcome", lambda v: v == "ok"),
               ("calls_failed", NS + "tool_calls", "outcome", lambda v: v != "ok")),
    "aggregator": (),
}
_LATENCY: dict[str, str] = {
    "ext_authz": NS + "decision_duration_seconds",
    "ext_proc": NS + "ext_proc_body_duration_seconds",
}


@dataclass(frozen=True, slots=True)
class MetricsTarget:
    component: str  # "ext_authz", "ext_proc", "aggregator", a server's name
    kind: str  # "ext_authz", "ext_proc", "server", "aggregator"
    url: str
    tls_name: str | None = None  # inner_tls: the name its certificate carries


def metrics_targets(cfg: GatewayConfig) -> tuple[MetricsTarget, ...]:
    """Where each of the config's services serves /metrics (as the dev stack starts them)."""
    def loop(host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host

    offset = cfg.telemetry.metrics_port_offset
    out: list[MetricsTarget] = []
    for kind, svc in (("ext_authz", cfg.ext_authz), ("ext_proc", cfg.ext_proc)):
        for inst in svc.instances:
            # A standalone plain-HTTP server bound to telemetry.metrics_host (every address in
            # containers: then the service's own host name reaches it).
            host = cfg.telemetry.metrics_host
            host = loop(inst.host) if host in ("0.0.0.0", "", "::", "[::]") else host
            out.append(MetricsTarget(kind, kind, f"http://{host}:{inst.port + offset}/metrics"))
    tls = cfg.inner_tls.enabled
    scheme = "https" if tls else "http"
    for server in cfg.servers:
        if server.kind == "url":
            continue  # runs elsewhere: its metrics, if any, are not ours to read
        name = cfg.inner_tls.san(inner_tls.server_identity(server.name)) if tls else None
        for inst in server.instances:
            out.append(MetricsTarget(server.name, "server",
                                     f"{scheme}://{loop(inst.host)}:{inst.port}/metrics", name))
    if cfg.aggregate.enabled:
        name = cfg.inner_tls.san(inner_tls.AGGREGATOR) if tls else None
        for inst in cfg.aggregate.instances:
            out.append(MetricsTarget("aggregator", "aggregator",
                                     f"{scheme}://{loop(inst.host)}:{inst.port}/metrics", name))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Reading:
    """One scrape's figures: counters summed per figure and the latency histogram's
    cumulative buckets ((upper bound, count), ascending)."""

    counts: dict[str, float]
    buckets: tuple[tuple[float, float], ...] = ()


def read_text(kind: str, text: str) -> Reading:
    """The figures of ``kind`` in a Prometheus text exposition (ValueError when it is not one)."""
    wanted = _COUNTS.get(kind, ())
    latency = _LATENCY.get(kind)
    counts = {figure: 0.0 for figure, *_ in wanted}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for figure, name, label, keep in wanted:
            if family.name != name:
                continue
            for s in family.samples:
                if s.name == name + "_total" and keep(s.labels.get(label, "") if label else ""):
                    counts[figure] += s.value
        if latency is not None and family.name == latency:
            for s in family.samples:
                if s.name == latency + "_bucket":
                    le = float(s.labels.get("le", "nan"))
                    if not math.isnan(le):
                        buckets[le] = buckets.get(le, 0.0) + s.value
    return Reading(counts, tuple(sorted(buckets.items())))


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """``q`` of cumulative buckets, interpolated inside the bucket as Prometheus's
    histogram_quantile does (None: no observation; the last finite bound when it falls in +Inf)."""
    rows = list(buckets)
    if not rows or rows[-1][1] <= 0:
        return None
    rank = q * rows[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in rows:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True, slots=True)
class Scrape:
    at: float
    reading: Reading | None  # None: down
    error: str | None = None


@dataclass(slots=True)
class TargetView:
    component: str
    kind: str
    url: str
    up: bool
    error: str | None
    # Per second between the last two scrapes (None until there are two).
    rates: dict[str, float | None] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None


class ServiceMetrics:
    """Scrapes every target, keeps the last ``keep`` scrapes of each."""

    def __init__(self, targets: Iterable[MetricsTarget], http: aiohttp.ClientSession, *, interval: float,
                 keep: int, timeout: float = SCRAPE_TIMEOUT_SECONDS,
                 client_tls: Callable[[], ssl.SSLContext | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        all_targets = list(targets)
        self.targets = all_targets[:MAX_TARGETS]
        self.dropped = len(all_targets) - len(self.targets)
        self.interval = interval
        self.history: dict[MetricsTarget, deque[Scrape]] = {t: deque(maxlen=keep) for t in self.targets}
        self._http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._client_tls = client_tls
        self._clock = clock
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def _fetch(self, target: MetricsTarget, tls: ssl.SSLContext | None) -> Scrape:
        at = self._clock()
        if target.url.startswith("https:") and tls is None:
            return Scrape(at, None, "no client certificate to present (inner_tls)")
        try:
            async with self._limit, self._http.get(
                    target.url, timeout=self._timeout, ssl=tls if tls is not None else True,
                    server_hostname=target.tls_name, headers={"accept": "text/plain"}) as resp:
                if resp.status != 200:
                    return Scrape(at, None, f"answered {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > MAX_METRICS_BYTES:
                        return Scrape(at, None, f"answer exceeds {MAX_METRICS_BYTES} bytes")
            return Scrape(at, read_text(target.kind, body.decode("utf-8", "replace")))
        except TimeoutError:
            return Scrape(at, None, "timed out")
        except aiohttp.ClientError as exc:
            return Scrape(at, None, f"{type(exc).__name__}: {str(exc)[:200]}")
        except ValueError as exc:  # not the Prometheus text format
            return Scrape(at, None, f"unreadable metrics: {str(exc)[:200]}")

    async def scrape_once(self) -> None:
        try:
            tls = self._client_tls()
        except (inner_tls.InnerTlsError, ssl.SSLError, OSError) as exc:
            logger.warning("the console's client certificate cannot be loaded: %s", exc)
            tls = None
        results = await asyncio.gather(*(self._fetch(t, tls) for t in self.targets))
        for target, scrape in zip(self.targets, results, strict=True):
            self.history[target].append(scrape)

    async def run(self) -> None:
        while True:
            await self.scrape_once()
            await asyncio.sleep(self.interval)

    def views(self) -> list[TargetView]:
        """Every target's state from its last two scrapes."""
        out = []
        for target in self.targets:
            scrapes = list(self.history[target])
            last = scrapes[-1] if scrapes else None
            view = TargetView(target.component, target.kind, target.url,
                              up=last is not None and last.reading is not None,
                              error="not scraped yet" if last is None else last.error)
            prev = scrapes[-2] if len(scrapes) > 1 else None
            if last is not None and last.reading is not None:
                view.rates = {k: None for k in last.reading.counts}
                cur_buckets = last.reading.buckets
                if prev is not None and prev.reading is not None and last.at > prev.at:
                    dt = last.at - prev.at
                    view.rates = {k: round(max(v - prev.reading.counts.get(k, 0.0), 0.0) / dt, 3)
                                  for k, v in last.reading.counts.items()}
                    delta = _delta(cur_buckets, prev.reading.buckets)
                    if delta and delta[-1][1] > 0:
                        cur_buckets = delta
                view.p50_ms = _ms(quantile(0.5, cur_buckets))
                view.p99_ms = _ms(quantile(0.99, cur_buckets))
            out.append(view)
        return out


def _delta(cur: tuple[tuple[float, float], ...],
           prev: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...] | None:
    """The buckets' counts over the interval (None when the bounds differ or a counter reset)."""
    if [b for b, _ in cur] != [b for b, _ in prev]:
        return None
    rows = tuple((b, c - p) for (b, c), (_, p) in zip(cur, prev, strict=True))
    return None if any(c < 0 for _, c in rows) else rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def as_json(views: Iterable[TargetView]) -> list[Mapping[str, object]]:
    return [{"component": v.component, "kind": v.kind, "url": v.url, "up": v.up, "error": v.error,
             "rates": v.rates, "p50_ms": v.p50_ms, "p99_ms": v.p99_ms} for v in views]


class ClientTls:
    """The console's inner_tls client context (its own certificate, the inner CA), rebuilt when
    the files change; None without inner_tls."""

    def __init__(self, files: inner_tls.TlsFiles | None) -> None:
        self._files = files
        self._digest = ""
        self._ctx: ssl.SSLContext | None = None

    def __call__(self) -> ssl.SSLContext | None:
        if self._files is None:
            return None
        digest = self._files.digest()
        if self._ctx is None or digest != self._digest:
            self._ctx = inner_tls.client_context(self._files)
            self._digest = digest
        return self._ctx
