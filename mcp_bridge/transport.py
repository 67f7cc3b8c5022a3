"""Streamable HTTP in front of stdio children: POST/GET/DELETE on the MCP path, /ready, /metrics.

Checks run in the order of ``mcp_servers.core.transport``: Host and Origin, media types, body
size, strict parsing (``gateway.jsonrpc.parse_message``), protocol version, session, Mcp-Method /
Mcp-Name against the body. A request is answered as JSON, or as SSE when the client accepts it and
the child sent something (progress, a request of its own) before the answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from gateway.assertion import InvalidAssertion
from gateway.caller import SessionOwner
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.jsonrpc import Message, best_effort_id, error_response, parse_message, result_response
from gateway.mcp import (
    HANDSHAKE_VERSIONS,
    META_PROTOCOL_VERSION,
    MODERN_VERSION,
    SUPPORTED_HEADER_VERSIONS,
    extract_context,
)
from gateway.telemetry.tracing import start_server_span
from mcp_bridge.errors import BridgeBusy, UpstreamProtocolError
from mcp_bridge.pool import META_CLIENT_CAPABILITIES, Pool
from mcp_bridge.router import Exchange, ExitLog, Link
from mcp_bridge.sessions import BridgeSession, SessionTable
from mcp_bridge.settings import BridgeSettings
from mcp_servers.core.errors import BadTransportRequest
from mcp_servers.core.http import (
    ALLOWED_METHODS,
    check_host_and_origin,
    json_response,
    media_types,
    method_not_allowed,
    post_media,
    read_body,
    request_caller,
)
from mcp_servers.core.identity import RequestIdentity, check_tool_claim, refusal_log
from mcp_servers.core.streams import EventStream
from mcp_servers.core.transport import MODERN_ERROR_STATUS, SSE_HEADERS, UnsupportedVersion

logger = logging.getLogger(__name__)

ANONYMOUS = SessionOwner(None, None, None)
TRACER = "mcp_bridge"


class Bridge:
    """The bridge's protocol state: sessions, the stateless pool, counters."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        # The verifier is installed by the app when assertion_jwks is set (make_app).
        self.identity = RequestIdentity()
        self.exits = ExitLog(settings)
        self.sessions = SessionTable(settings, self.exits)
        self.pool = Pool(settings, self.exits)
        self.draining = False
        self.counters: dict[str, int] = {}
        self._allowed_hosts = {h.lower() for h in settings.allowed_hosts}

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    @property
    def in_flight(self) -> int:
        links = [s.link for s in self.sessions.all()] + self.pool.links
        return sum(link.in_flight for link in links)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.exits.crash_looping:
            return False, "crash-looping"
        if self.settings.pool_size > 0 and not self.pool.ready:
            return False, "no pool child is up"
        return True, "ready"

    # ---- HTTP entry points ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return await self._handle(request)
        # The parent is Envoy's span (traceparent); stdio carries no trace context, so the trace
        # ends here.
        with start_server_span("mcp", request.headers, tracer_name=TRACER,
                               attributes={"mcp.server": self.settings.name}) as span:
            response = await self._handle(request)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_host_and_origin(request)
            try:
                await self.identity.establish(request)
            except InvalidAssertion as exc:
                refusal_log(request, exc)
                raise
            if request.method == "POST":
                return await self._post(request)
            if request.method == "GET":
                return await self._get(request)
            if request.method == "DELETE":
                return await self._delete(request)
            raise method_not_allowed(request.method)
        except GatewayError as exc:
            self.count(f"rejected_{exc.code}")
            logger.info("rejected %s: %s", request.method, exc.message,
                        extra={"reason": exc.code, "status": exc.http_status})
            response = json_response(error_response(None, exc.to_rpc_error()), exc.http_status)
            if exc.http_status == 405:
                response.headers["Allow"] = ALLOWED_METHODS
            if exc.http_status == 503:
                response.headers["Retry-After"] = str(self.settings.retry_after_seconds)
            return response

    async def ready(self, _request: web.Request) -> web.Response:
        ok, reason = self.readiness()
        return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)

    async def metrics(self, _request: web.Request) -> web.Response:
        children = sum(1 for s in self.sessions.all() if s.link.ready.is_set())
        children += sum(1 for link in self.pool.links if link.ready.is_set())
        lines = [
            "# TYPE mcp_bridge_children_up gauge", f"mcp_bridge_children_up {children}",
            "# TYPE mcp_bridge_sessions gauge", f"mcp_bridge_sessions {len(self.sessions)}",
            "# TYPE mcp_bridge_in_flight gauge", f"mcp_bridge_in_flight {self.in_flight}",
            "# TYPE mcp_bridge_restarts_total counter", f"mcp_bridge_restarts_total {self.exits.restarts}",
            "# TYPE mcp_bridge_rejected_total counter",
        ]
        for name, value in sorted(self.counters.items()):
            if name.startswith("rejected_"):
                lines.append(f'mcp_bridge_rejected_total{{reason="{name[9:]}"}} {value}')
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def children(self, _request: web.Request) -> web.Response:
        """Loopback diagnostics: each session's and pool slot's child pid and requests in flight."""
        def describe(link: Link) -> dict[str, Any]:
            child = link.child
            return {"pid": child.pid if child is not None and child.alive else None,
                    "in_flight": link.in_flight, "ready": link.ready.is_set()}
        return web.json_response({
            "sessions": {s.id[:8]: describe(s.link) for s in self.sessions.all()},
            "pool": [describe(link) for link in self.pool.links]})

    def _check_host_and_origin(self, request: web.Request) -> None:
        # The bridge names hosts only; "*" there lets any Origin through too.
        check_host_and_origin(request, self._allowed_hosts,
                              ("*",) if "*" in self._allowed_hosts else ())

    @staticmethod
    def _owner(request: web.Request) -> SessionOwner:
        caller = request_caller(request)
        return caller.owner if caller is not None else ANONYMOUS

    # ---- POST -------------------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        _, sse_ok = post_media(request)
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except PayloadTooLarge as exc:
            response = json_response(error_response(None, exc.to_rpc_error()), exc.http_status)
            response.force_close()
            return response
        try:
            msg = parse_message(body, max_bytes=self.settings.max_body_bytes)
        except GatewayError as exc:
            return json_response(error_response(best_effort_id(body), exc.to_rpc_error()), exc.http_status)
        if msg.method is not None:
            span = trace.get_current_span()
            span.update_name(msg.method)
            span.set_attribute("mcp.method", msg.method)
        try:
            return await self._post_message(request, msg, sse_ok=sse_ok)
        except GatewayError as exc:
            if exc.http_status == 503:
                self.count(f"rejected_{exc.code}")
                return json_response(error_response(msg.id, exc.to_rpc_error()), 503,
                             {"Retry-After": str(self.settings.retry_after_seconds)})
            return json_response(error_response(msg.id, exc.to_rpc_error()), exc.http_status)

    async def _post_message(self, request: web.Request, msg: Message, *, sse_ok: bool) -> web.StreamResponse:
        header_version = request.headers.get("MCP-Protocol-Version")
        if header_version is not None and header_version not in SUPPORTED_HEADER_VERSIONS:
            raise UnsupportedVersion(f"unsupported MCP-Protocol-Version {header_version!r}",
                                     data={"supported": list(SUPPORTED_HEADER_VERSIONS),
                                           "requested": header_version})
        sid = request.headers.get("Mcp-Session-Id")
        owner = self._owner(request)
        if msg.kind == "response":
            if sid is not None:
                self.sessions.get(sid, owner).client_response(msg.raw)
            return web.Response(status=202)
        ctx = extract_context(msg, request.headers)
        if msg.method == "tools/call":
            check_tool_claim(request, ctx.tool)
        if msg.method == "initialize":
            if msg.kind != "request":
                raise InvalidRequest("initialize must be a request with an id")
            return await self._initialize(msg, owner)
        if sid is not None:
            session = self.sessions.get(sid, owner)
            if msg.kind == "notification":
                await self._session_notification(session, msg)
                return web.Response(status=202)
            if self.in_flight >= self.settings.max_in_flight:
                raise BridgeBusy("too many requests in flight; retry later")
            exchange = session.link.new_exchange(msg.id, msg.method or "")
            session.track(exchange)
            try:
                await session.link.request(msg.raw, exchange)
            except GatewayError:
                exchange.future.cancel()  # untracked by its done callback
                raise
            return await self._answer(request, exchange, session.link, sse_ok=sse_ok, session=session)
        modern = ctx.protocol_version is not None and ctx.protocol_version >= MODERN_VERSION
        if modern or (msg.method == "server/discover" and msg.kind == "request"):
            if msg.kind == "notification":
                return web.Response(status=202)  # 2026-07-28: cancelling is closing the stream
            if modern:
                self._check_envelope(msg, header_version)
            if self.draining:
                raise BridgeBusy("the bridge is shutting down")
            if self.in_flight >= self.settings.max_in_flight:
                raise BridgeBusy("too many requests in flight; retry later")
            exchange = Exchange(client_id=msg.id, method=msg.method or "",
                                stream=EventStream(max_buffered=self.settings.max_buffered_events),
                                future=asyncio.get_running_loop().create_future(), modern=True)
            link = await self.pool.forward(msg.raw, exchange)
            return await self._answer(request, exchange, link, sse_ok=sse_ok, session=None)
        raise BadTransportRequest("missing Mcp-Session-Id header: send initialize first, or use protocol "
                         f"{MODERN_VERSION} with params._meta on every request", code="session_required")

    @staticmethod
    def _check_envelope(msg: Message, header_version: str | None) -> None:
        meta = msg.params.get("_meta")
        if not isinstance(meta, dict) or META_PROTOCOL_VERSION not in meta \
                or not isinstance(meta.get(META_CLIENT_CAPABILITIES), dict):
            raise GatewayError(f"params._meta must carry {META_PROTOCOL_VERSION!r} and "
                               f"{META_CLIENT_CAPABILITIES!r} (protocol {MODERN_VERSION})",
                               code="invalid_params", rpc_code=-32602, http_status=400)
        if header_version != meta[META_PROTOCOL_VERSION]:
            raise GatewayError("MCP-Protocol-Version header does not match params._meta protocol version",
                               code="header_mismatch", rpc_code=-32020, http_status=400)

    async def _initialize(self, msg: Message, owner: SessionOwner) -> web.Response:
        if self.draining:
            raise BridgeBusy("the bridge is shutting down")
        if self.in_flight >= self.settings.max_in_flight:
            raise BridgeBusy("too many requests in flight; retry later")
        params = msg.params
        if not isinstance(params.get("protocolVersion"), str):
            raise GatewayError("params.protocolVersion must be a string", code="invalid_params",
                               rpc_code=-32602, http_status=400)
        try:
            session = await self.sessions.create(owner, dict(params))
        except UpstreamProtocolError as exc:
            upstream = exc.data.get("upstream_error") if isinstance(exc.data, dict) else None
            if isinstance(upstream, dict):
                return json_response(error_response(msg.id, upstream))  # the server refused: its answer
            raise
        result = session.init_result or {}
        if result.get("protocolVersion") not in HANDSHAKE_VERSIONS:
            logger.warning("the stdio server negotiated a version the bridge does not list",
                           extra={"protocol_version": result.get("protocolVersion")})
        return json_response(result_response(msg.id, result), headers={"Mcp-Session-Id": session.id})

    async def _session_notification(self, session: BridgeSession, msg: Message) -> None:
        if msg.method == "notifications/initialized":
            if session.initialized:
                return
            session.initialized = True
            session.link.notify(msg.raw)
        elif msg.method == "notifications/cancelled":
            rid = msg.params.get("requestId")
            exchange = session.by_client.get(rid) if isinstance(rid, (str, int)) else None
            if exchange is not None:
                reason = msg.params.get("reason")
                await session.link.cancel(exchange, reason if isinstance(reason, str) else None)
        else:
            session.link.notify(msg.raw)

    async def _answer(self, request: web.Request, exchange: Exchange, link: Link | None, *, sse_ok: bool,
                      session: BridgeSession | None) -> web.StreamResponse:
        """Answer as JSON or SSE. A 2026-07-28 client that goes away cancels its request; a
        handshake-era one does not (its answer stays on the stream for a resumption)."""
        try:
            return await self._respond(request, exchange, link, sse_ok=sse_ok, session=session)
        except asyncio.CancelledError:  # the client disconnected (handler cancellation)
            if exchange.modern and link is not None and not exchange.future.done():
                await link.cancel(exchange, "the client closed the response stream")
            raise

    async def _respond(self, request: web.Request, exchange: Exchange, link: Link | None, *, sse_ok: bool,
                       session: BridgeSession | None) -> web.StreamResponse:
        headers = {"Mcp-Session-Id": session.id} if session is not None else {}
        if not sse_ok:
            # Shielded: a disconnect must not cancel the exchange the child is still answering.
            return self._final(await asyncio.shield(exchange.future), exchange, headers)
        await exchange.stream.wait_first()
        if exchange.future.done() and exchange.notifications == 0:
            return self._final(exchange.future.result(), exchange, headers)
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        if session is not None:
            await response.write(f"id: {exchange.stream.event_id(0)}\nretry: {self.settings.sse_retry_ms}\n"
                                 "data: \n\n".encode())
        delivered = await self._pump(response, exchange.stream, 0)
        if not delivered and exchange.modern and link is not None and not exchange.future.done():
            await link.cancel(exchange, "the client closed the response stream")
        return response

    @staticmethod
    def _final(answer: dict[str, Any], exchange: Exchange, headers: dict[str, str]) -> web.Response:
        status = exchange.http_status
        if exchange.modern and status == 200 and "error" in answer:
            status = MODERN_ERROR_STATUS.get(answer["error"].get("code"), 200)
        return json_response(answer, status, headers)

    async def _pump(self, response: web.StreamResponse, stream: EventStream, after: int) -> bool:
        try:
            async for item in stream.follow(after, self.settings.sse_keepalive):
                if item is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                seq, data = item
                await response.write(b"id: " + stream.event_id(seq).encode() + b"\nevent: message\ndata: "
                                     + data + b"\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            return False
        return True

    # ---- GET / DELETE -----------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if "text/event-stream" not in media_types(request.headers.get("Accept", "")):
            raise BadTransportRequest("GET needs Accept: text/event-stream", http_status=406)
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None:
            raise BadTransportRequest("GET needs an Mcp-Session-Id header (no GET stream in protocol "
                             f"{MODERN_VERSION})", http_status=405)
        session = self.sessions.get(sid, self._owner(request))
        last = request.headers.get("Last-Event-ID")
        found = session.find_stream(last) if last else None
        stream, after = found if found is not None else (session.standalone_stream(), 0)
        if stream.attached:
            raise BadTransportRequest("this stream already has a listener", http_status=409)
        if self.draining and stream.standalone:
            raise BridgeBusy("the bridge is shutting down")
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, "Mcp-Session-Id": session.id})
        await response.prepare(request)
        await response.write(f"id: {stream.event_id(after)}\nretry: {self.settings.sse_retry_ms}\n"
                             "data: \n\n".encode())
        await self._pump(response, stream, after)
        return response

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None:
            raise BadTransportRequest("DELETE needs an Mcp-Session-Id header")
        session = self.sessions.get(sid, self._owner(request))
        await self.sessions.remove(session)
        return web.Response(status=200)

    # ---- lifecycle --------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Not ready, no new sessions; wait for in-flight requests up to ``drain_seconds``."""
        self.draining = True
        links = [s.link for s in self.sessions.all()] + self.pool.links
        waiting = [e.future for link in links for e in link.pending.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=self.settings.drain_seconds)
        for session in self.sessions.all():
            for stream in list(session.streams.values()):
                await stream.finish()

    async def close(self) -> None:
        await asyncio.gather(self.sessions.close_all(), self.pool.close())
