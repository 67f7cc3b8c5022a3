"""ext_authz over Envoy's HTTP mode (``http_service``), on aiohttp: the same decision core as the
gRPC servicer (an ``ext_authz.front.DecisionCore``), with less transport cost per request.

The contract with Envoy (rendered by ``gatewayctl.envoy_config`` when ``ext_authz.transport`` is
``http``):

- Envoy sends the checked request's method, ``PATH_PREFIX`` + path, the headers its
  ``allowed_headers`` list names, and the body (``with_request_body``).
- 200 allows. The upstream request gets the answer headers its ``allowed_upstream_headers`` list
  names (overwriting the client's), loses those named in ``x-envoy-auth-headers-to-remove`` (the
  token, gateway-owned headers not set), and the caller context for ext_proc travels as JSON text
  in :data:`CONTEXT_HEADER`, which Envoy files as dynamic metadata
  (``dynamic_metadata_from_headers``) and never forwards.
- Any other status is a denial: the client's answer (status, body, the headers
  ``allowed_client_headers`` names). Envoy takes a 5xx for a failure of the service and would
  answer ``status_on_error`` without this service's JSON-RPC body or ``Retry-After``; so this
  service's own 5xx answers (keys, catalog, audit or rate-limit store unavailable, internal
  error) go as 400 with the real status in :data:`STATUS_HEADER`, which the rendered
  ``local_reply_config`` puts back.
- ``GET /-/health`` is Envoy's health check: 200 once warm, 503 before and while draining.
"""

from __future__ import annotations

import json
import logging

import orjson
from aiohttp import web

from ext_authz.front import DecisionCore
from ext_authz.request import HttpRequest
from ext_authz.response import Verdict
from gateway.inner_peers import PeerGate
from gateway.inner_tls import PeerPolicy, ReloadingTls
from gateway.service import (
    SHUTDOWN_GRACE_SECONDS,
    GrpcSettings,
    start_observability,
    stop_observability,
)
from gateway.telemetry.metrics import MetricsServer
from gateway.wire import CONTEXT_HEADER, PEER_HEADER, REMOVE_HEADER, STATUS_HEADER

logger = logging.getLogger(__name__)

PATH_PREFIX = "/check"
HEALTH_PATH = "/-/health"
# gateway.wire's signal headers: the caller context (ext_authz metadata for ext_proc) as JSON
# text in CONTEXT_HEADER (not an x- name, so the upstream allow-list, prefix x-, can never
# forward it); the removals in REMOVE_HEADER; the client's address in PEER_HEADER (added by Envoy
# to each check); a 5xx answer as a 400 denial with its status in STATUS_HEADER (see answer()).
CARRIER_STATUS = 400
CARRIED_STATUSES = frozenset({500, 501, 502, 503, 504})
_TRACE_HEADERS = ("traceparent", "tracestate")
_JSON = {"content-type": "application/json"}
_NOT_FOUND = b'{"error":"not_found"}'
MAX_HEADER_BYTES = 64 * 1024


def read_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes
                 ) -> HttpRequest:
    """The checked request from Envoy's authorization request (``path`` without the prefix).

    Names are lower-cased and repeats joined with "," as Envoy does for gRPC's header map. The
    client address is :data:`PEER_HEADER` (else the last ``x-forwarded-for`` entry).
    """
    merged: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    # Set by Envoy (authorization_request.headers_to_add, overwriting any client copy); else
    # the last x-forwarded-for entry, which Envoy appends.
    source = merged.get(PEER_HEADER) or merged.get("x-forwarded-for", "").rsplit(",", 1)[-1].strip()
    return HttpRequest(merged.get("x-request-id", ""), method, path, merged.get("host", ""),
                       merged.get("x-forwarded-proto", "https"), merged, body, source)


def answer(verdict: Verdict) -> web.Response:
    """The HTTP answer Envoy's ext_authz filter reads (see the module docstring)."""
    if not verdict.ok:
        if verdict.status < 400:  # never an allow by accident: Envoy allows on 200 alone
            return web.Response(status=403, body=verdict.body, headers={**_JSON, **verdict.headers})
        if verdict.status < 500:
            return web.Response(status=verdict.status, body=verdict.body,
                                headers={**_JSON, **verdict.headers})
        # Envoy would take a 5xx for a failure and drop this answer: carried as a denial, the
        # real status restored by the rendered local_reply_config (500-504; others become 503).
        status = verdict.status if verdict.status in CARRIED_STATUSES else 503
        return web.Response(status=CARRIER_STATUS, body=verdict.body,
                            headers={**_JSON, **verdict.headers, STATUS_HEADER: str(status)})
    headers = verdict.upstream_headers()
    headers[REMOVE_HEADER] = ",".join(verdict.removed_headers())
    if verdict.metadata:
        headers[CONTEXT_HEADER] = context_text(verdict.metadata)
    return web.Response(status=200, headers=headers)


def context_text(metadata: object) -> str:
    """JSON text safe in a header value (ASCII; non-ASCII characters as \\u escapes)."""
    text = orjson.dumps(metadata).decode()
    return text if text.isascii() else json.dumps(metadata, separators=(",", ":"))


class HttpService:
    """The HTTP front: the same life cycle as ``gateway.service.GrpcService`` (open, start,
    set_serving, drain, close), /metrics on port + offset and tracing included."""

    def __init__(self, settings: GrpcSettings, runner: web.ServerRunner, port: int,
                 metrics: MetricsServer, tracing: bool, max_body: int) -> None:
        self.settings = settings
        self.port = port
        self.metrics = metrics
        self.tracing = tracing
        self._runner = runner
        self._max_body = max_body
        self._core: DecisionCore | None = None
        self._serving = False
        self._stopped = False
        self._closed = False
        self._tls: ReloadingTls | None = None
        # inner_tls: the callers' certificates checked once per connection (Envoy's only).
        self._peers: PeerGate | None = None

    @classmethod
    async def open(cls, settings: GrpcSettings, *, max_body: int) -> HttpService:
        """Bind the port and start /metrics and tracing; health answers 503 until
        :meth:`set_serving`. Raises OSError when the port cannot be bound."""
        holder: list[HttpService] = []

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            return await holder[0]._handle(request)

        # Envoy accepts request headers up to max_request_headers_kb (32 KiB, tokens included);
        # aiohttp's default 8 KiB field limit would refuse a large token with its own 400.
        server = web.Server(handle, access_log=None, max_line_size=MAX_HEADER_BYTES,
                            max_field_size=MAX_HEADER_BYTES)
        runner = web.ServerRunner(server,
                                  shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
        await runner.setup()
        listen = settings.listen
        tls = (ReloadingTls(settings.tls, peers=PeerPolicy(settings.tls.cert_file, settings.peers))
               if settings.tls is not None else None)
        # reuse_port off: a second instance on a taken port must fail, not silently share it.
        site = web.TCPSite(runner, listen.host, listen.port, reuse_port=False,
                           ssl_context=tls.context if tls is not None else None)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        port = runner.addresses[0][1]
        try:
            metrics, tracing = start_observability(settings, port)
        except BaseException:
            await runner.cleanup()
            raise
        service = cls(settings, runner, port, metrics, tracing, max_body)
        if tls is not None:
            service._tls = tls
            assert tls.peers is not None
            service._peers = PeerGate(tls.peers, settings.name)
            tls.start()
        holder.append(service)
        return service

    def register(self, core: DecisionCore) -> None:
        self._core = core

    async def start(self) -> None:
        """Nothing to do: the socket listens from :meth:`open`; checks wait for set_serving."""

    async def set_serving(self) -> None:
        self._serving = True

    async def drain(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        """Report 503 on health, refuse new connections, give checks in flight up to
        ``SHUTDOWN_GRACE_SECONDS`` (aiohttp's runner takes the grace when it is made)."""
        self._serving = False
        if not self._stopped:
            self._stopped = True
            await self._runner.cleanup()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.drain(None)
        if self._tls is not None:
            await self._tls.stop()
        await stop_observability(self.metrics, self.tracing)

    async def stop(self, grace: float | None = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.drain(grace)
        await self.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._peers is not None and (refused := self._peers.refusal(request)) is not None:
            return refused
        path = request.raw_path
        if path.startswith(PATH_PREFIX) and path[len(PATH_PREFIX):len(PATH_PREFIX) + 1] == "/":
            core = self._core
            if core is None or not self._serving:
                # Not warm yet (or draining): a real 5xx, a failure for Envoy, which retries
                # the check on another process.
                return web.Response(status=503, headers={"retry-after": "1"})
            length = request.content_length
            if length is None and request.body_exists:
                return web.Response(status=411, headers=_JSON, body=b'{"error":"length_required"}')
            if length is not None and length > self._max_body:
                return web.Response(status=413, headers=_JSON, body=b'{"error":"too_large"}')
            body = await request.content.readexactly(length) if length else b""
            req = read_request(request.method, path[len(PATH_PREFIX):],
                               list(request.headers.items()), body)
            trace = {n: req.headers[n] for n in _TRACE_HEADERS if n in req.headers}
            return answer(await core.decide(req, trace))
        if path == HEALTH_PATH:
            return web.Response(status=200 if self._serving else 503, headers=_JSON,
                                body=b'{"status":"serving"}' if self._serving
                                else b'{"status":"not_serving"}')
        return web.Response(status=404, headers=_JSON, body=_NOT_FOUND)
