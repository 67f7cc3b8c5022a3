"""The aggregator's HTTP service: ``/mcp`` and ``/mcp/<virtual>`` (POST, GET, DELETE),
``/health``, ``/ready`` and ``/metrics``.

Checks run in the order of ``mcp_servers.core.transport``: Host and Origin, media types, body
size, strict parsing, protocol version, session, Mcp-Method / Mcp-Name against the body. It never
decides policy: every leg goes through Envoy's per-server route (ext_authz, ext_proc), carrying
the client's Authorization.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import inner_tls
from gateway.aggregate.cursor import InvalidCursor as CursorRefused
from gateway.aggregate.cursor import open_cursor, seal_cursor
from gateway.aggregate.naming import decode_request_id
from gateway.aggregate.session_token import AggregateSession, SessionSealer
from gateway.aggregate.views import View
from gateway.assertion import DEFAULT_LEEWAY_SECONDS, InvalidAssertion
from gateway.caller import SessionOwner
from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge
from gateway.inner_peers import guard_app
from gateway.jsonrpc import Message, best_effort_id, error_response, parse_message, result_response
from gateway.mcp import (
    LATEST_HANDSHAKE_VERSION,
    MODERN_VERSION,
    PROTOCOL_VERSIONS,
    SUPPORTED_HEADER_VERSIONS,
    extract_context,
)
from gateway.signals import stop_event
from gateway.telemetry.metrics import add_metrics_route
from mcp_aggregator.errors import RPC_ERROR, InvalidCursor, UpstreamFailed
from mcp_aggregator.fanout import FanOut, fan_out
from mcp_aggregator.lists import LIST_KINDS, UNAVAILABLE_META, ListKind, assemble, plan, union_capabilities
from mcp_aggregator.sessions import MemoryFacts, RedisFacts, SessionFacts, Sessions
from mcp_aggregator.settings import AggregatorSettings
from mcp_aggregator.streams import FanIn
from mcp_aggregator.upstreams import LegContext, Upstreams
from mcp_servers.core.errors import BadTransportRequest, MethodNotFound
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
from mcp_servers.core.identity import RequestIdentity, identity_context, refusal_log
from mcp_servers.core.transport import (
    CACHEABLE_METHODS,
    META_SERVER_INFO,
    MODERN_ERROR_STATUS,
    SSE_HEADERS,
    UnsupportedVersion,
    handshake_params,
    modern_envelope,
)

logger = logging.getLogger(__name__)

ANONYMOUS = SessionOwner(None, None, None)
VERSION = "1.0.0"
METHOD_NOT_FOUND_CODE = -32601
# Methods aimed at one server: Envoy's fast path carries them, so the aggregator never sees them.
FAST_PATH_METHODS = frozenset({"tools/call", "prompts/get", "resources/read", "resources/subscribe",
                               "resources/unsubscribe", "completion/complete"})


def _owner(request: web.Request) -> SessionOwner:
    caller = request_caller(request)
    return caller.owner if caller is not None else ANONYMOUS


def _leg_context(request: web.Request, version: str, view: View) -> LegContext:
    return LegContext.of(request.headers, version, None if view.is_aggregate else view.name)


def _owner_text(owner: SessionOwner) -> str:
    return owner.encode().decode()


class Aggregator:
    """The aggregator's protocol state: views, the key ring, the legs' HTTP client."""

    def __init__(self, settings: AggregatorSettings, facts: SessionFacts | None = None) -> None:
        self.settings = settings
        # The verifier is installed by the app when assertion_jwks is set (make_app).
        self.identity = RequestIdentity()
        self.sealer = SessionSealer(settings.keys)
        if facts is None:
            facts = RedisFacts(settings.redis_url) if settings.redis_url else MemoryFacts()
        self.sessions = Sessions(self.sealer, facts, settings.session_ttl)
        self.ready = True
        self._upstreams: Upstreams | None = None
        self._allowed_hosts = {h.lower() for h in settings.allowed_hosts}
        self._closing = asyncio.Event()
        # GET fan-ins in progress (tests wait for their upstream streams to open).
        self.fan_ins: list[FanIn] = []

    @property
    def upstreams(self) -> Upstreams:
        assert self._upstreams is not None, "the aggregator is not started"
        return self._upstreams

    async def lifespan(self, _app: web.Application) -> AsyncIterator[None]:
        # inner_tls: the legs go to Envoy's inner listener over TLS with this process's
        # certificate (the same files it serves with; reloaded on change).
        files = inner_tls.files_from_env()
        client = inner_tls.ReloadingTls(files, server=False) if files is not None else None
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.leg_timeout),
                connector=aiohttp.TCPConnector(ssl=client.context if client is not None else True),
                auto_decompress=True) as http, inner_tls.watching(client):
            self._upstreams = Upstreams(self.settings.base, http)
            yield
            self._closing.set()
        await self.sessions.facts.close()

    def server_info(self, view: View) -> dict[str, Any]:
        info: dict[str, Any] = {"name": self.settings.server_name if view.is_aggregate else view.name,
                                "version": VERSION}
        return info

    # ---- HTTP entry points ------------------------------------------------------------------------

    def handler(self, view: View) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                check_host_and_origin(request, self._allowed_hosts,
                                      ("*",) if "*" in self._allowed_hosts else ())
                try:
                    await self.identity.establish(request)
                except InvalidAssertion as exc:
                    refusal_log(request, exc)
                    raise
                if request.method == "POST":
                    return await self._post(request, view)
                if request.method == "GET":
                    return await self._get(request, view)
                if request.method == "DELETE":
                    return await self._delete(request, view)
                raise method_not_allowed(request.method)
            except GatewayError as exc:
                logger.info("rejected %s: %s", request.method, exc.message,
                            extra={"reason": exc.code, "status": exc.http_status})
                response = json_response(error_response(None, exc.to_rpc_error()), exc.http_status)
                if exc.http_status == 405:
                    response.headers["Allow"] = ALLOWED_METHODS
                return response
        return handle

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "server": "mcp_aggregator"})

    async def ready_check(self, _request: web.Request) -> web.Response:
        if self.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)

    # ---- POST -------------------------------------------------------------------------------------

    async def _post(self, request: web.Request, view: View) -> web.StreamResponse:
        post_media(request)
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
        modern = False
        try:
            header_version = request.headers.get("MCP-Protocol-Version")
            if header_version is not None and header_version not in SUPPORTED_HEADER_VERSIONS:
                raise UnsupportedVersion(f"unsupported MCP-Protocol-Version {header_version!r}",
                                         data={"supported": list(SUPPORTED_HEADER_VERSIONS),
                                               "requested": header_version})
            owner = _owner(request)
            sid = request.headers.get("Mcp-Session-Id")
            if msg.kind == "response":
                await self._client_response(request, view, msg, sid, owner)
                return web.Response(status=202)
            mcp_ctx = extract_context(msg, request.headers)
            if msg.method == "initialize":
                if msg.kind != "request":
                    raise InvalidRequest("initialize must be a request with an id")
                return await self._initialize(request, view, msg, owner)
            session: AggregateSession | None = None
            if sid is not None:
                session = await self.sessions.open(sid, owner, view.name)
                version = header_version or session.protocol_version
            elif mcp_ctx.protocol_version is not None and mcp_ctx.protocol_version >= MODERN_VERSION:
                modern = True
                if msg.kind == "notification":
                    return web.Response(status=202)  # 2026-07-28: cancelling is closing the stream
                version, _caps = modern_envelope(msg, header_version)
            elif msg.method == "server/discover" and msg.kind == "request":
                version = header_version or LATEST_HANDSHAKE_VERSION
            else:
                raise BadTransportRequest("missing Mcp-Session-Id header: send initialize first, or use "
                                          f"protocol {MODERN_VERSION} with params._meta on every request",
                                          code="session_required")
            ctx = _leg_context(request, version, view)
            if msg.kind == "notification":
                assert session is not None and sid is not None
                await self._notify(view, msg, sid, session, ctx)
                return web.Response(status=202)
            result = await self._request(view, msg, sid, session, ctx, owner)
        except GatewayError as exc:
            status = exc.http_status
            if modern and status == 200:
                status = MODERN_ERROR_STATUS.get(exc.rpc_code, 200)
            return json_response(error_response(msg.id, exc.to_rpc_error()), status)
        if modern:
            result = self._modern_result(view, msg.method or "", result)
        return json_response(result_response(msg.id, result))

    def _modern_result(self, view: View, method: str, result: dict[str, Any]) -> dict[str, Any]:
        result = {**result, "resultType": "complete"}
        if method in CACHEABLE_METHODS:
            result.setdefault("ttlMs", 0)
            result.setdefault("cacheScope", "private")
        meta = result.get("_meta")
        result["_meta"] = {**(meta if isinstance(meta, dict) else {}),
                           META_SERVER_INFO: self.server_info(view)}
        return result

    async def _request(self, view: View, msg: Message, sid: str | None, session: AggregateSession | None,
                       ctx: LegContext, owner: SessionOwner) -> dict[str, Any]:
        method = msg.method or ""
        if method == "ping":
            return {}
        if method == "server/discover":
            return await self._discover(view, msg, ctx)
        kind = LIST_KINDS.get(method)
        if kind is not None:
            return await self._list(view, kind, msg, sid, session, ctx, owner)
        if method == "logging/setLevel" and session is not None and sid is not None:
            ids = await self._ids(view, sid, session)
            await fan_out([s for s, u in ids.items() if u is not None],
                          lambda server: self._call(server, method, msg.params, ctx, ids[server]),
                          leg_timeout=self.settings.leg_timeout, method=method)
            return {}
        if method in FAST_PATH_METHODS:
            raise MethodNotFound(f"{method} is routed by the gateway to the server its name names; "
                                 "it does not reach the aggregator", data={"method": method})
        raise MethodNotFound(f"method not found: {method}", data={"method": method})

    async def _call(self, server: str, method: str, params: dict[str, Any], ctx: LegContext,
                    session_id: str | None) -> dict[str, Any]:
        """One request leg's result; a JSON-RPC error is UpstreamFailed, except method-not-found,
        which is an empty result (the server offers none of these)."""
        message = {"jsonrpc": "2.0", "id": self.upstreams.next_id(), "method": method, "params": params}
        answer = await self.upstreams.request(server, message, ctx, session_id=session_id)
        error = answer.error
        if error is not None:
            if error.get("code") == METHOD_NOT_FOUND_CODE:
                return {}
            raise UpstreamFailed(server, RPC_ERROR, f"{method} answered error {error.get('code')}")
        result = answer.result
        if result is None:
            raise UpstreamFailed(server, RPC_ERROR, f"{method} answered a non-object result")
        return result

    # ---- initialize / discover ----------------------------------------------------------------

    async def _initialize(self, request: web.Request, view: View, msg: Message,
                          owner: SessionOwner) -> web.Response:
        version, caps, info = handshake_params(msg.params)
        ctx = _leg_context(request, version, view)

        async def leg(server: str) -> tuple[str, dict[str, Any]]:
            return await self._join_upstream(server, ctx, caps, info)

        fan = await fan_out(view.servers, leg, leg_timeout=self.settings.leg_timeout, method="initialize")
        session = AggregateSession(issuer=owner.iss, subject=owner.sub, tenant=owner.tenant, view=view.name,
                                   protocol_version=version, capabilities=caps,
                                   upstream={s: sid for s, (sid, _) in fan.answers.items()},
                                   issued_at=int(time.time()))
        sid = self.sessions.seal(session)
        results = [r for _, r in fan.answers.values()]
        result: dict[str, Any] = {"protocolVersion": version, **self._summary(view, results, fan)}
        logger.info("aggregate session created", extra={"view": view.name, "protocol_version": version,
                                                         "servers": sorted(fan.answers),
                                                         "unavailable": sorted(fan.unavailable)})
        return json_response(result_response(msg.id, result), headers={"Mcp-Session-Id": sid})

    def _summary(self, view: View, results: list[dict[str, Any]], fan: FanOut[Any]) -> dict[str, Any]:
        """Capabilities, server info and instructions of the servers that answered."""
        caps = union_capabilities([r["capabilities"] for r in results
                                   if isinstance(r.get("capabilities"), dict)])
        out: dict[str, Any] = {"capabilities": caps, "serverInfo": self.server_info(view)}
        parts = []
        for server in view.servers:
            answer = fan.answers.get(server)
            result = answer[1] if isinstance(answer, tuple) else answer
            text = result.get("instructions") if isinstance(result, dict) else None
            if isinstance(text, str) and text:
                parts.append(f"{server}: {text}")
        if parts:
            out["instructions"] = "\n\n".join(parts)
        if fan.unavailable:
            out["_meta"] = {UNAVAILABLE_META: fan.unavailable_meta()}
        return out

    async def _join_upstream(self, server: str, ctx: LegContext, caps: Any,
                             info: Any) -> tuple[str, dict[str, Any]]:
        """Initialize one upstream session: (its session id, "" for a server without sessions;
        its initialize result)."""
        params = {"protocolVersion": ctx.protocol_version, "capabilities": caps, "clientInfo": info}
        message = {"jsonrpc": "2.0", "id": self.upstreams.next_id(), "method": "initialize", "params": params}
        answer = await self.upstreams.request(server, message, ctx)
        if answer.error is not None or answer.result is None:
            code = answer.error.get("code") if answer.error is not None else None
            raise UpstreamFailed(server, RPC_ERROR, f"initialize answered error {code}")
        upstream_sid = answer.session_id or ""
        await self.upstreams.send(server, {"jsonrpc": "2.0", "method": "notifications/initialized"}, ctx,
                                  session_id=upstream_sid)
        return upstream_sid, answer.result

    async def _discover(self, view: View, msg: Message, ctx: LegContext) -> dict[str, Any]:
        fan = await fan_out(view.servers,
                            lambda server: self._call(server, "server/discover", msg.params, ctx, None),
                            leg_timeout=self.settings.leg_timeout, method="server/discover")
        return {"supportedVersions": list(PROTOCOL_VERSIONS),
                **self._summary(view, [r for r in fan.answers.values() if r], fan)}

    # ---- lists --------------------------------------------------------------------------------

    async def _ids(self, view: View, sid: str, session: AggregateSession) -> dict[str, str | None]:
        return await self.sessions.upstream_ids(sid, session, view.servers)

    async def _late_join(self, server: str, sid: str, session: AggregateSession, ctx: LegContext) -> str:
        upstream_sid, _ = await self._join_upstream(server, ctx, dict(session.capabilities), {
            "name": "mcp-gateway-aggregator", "version": VERSION})
        await self.sessions.joined(sid, server, upstream_sid)
        return upstream_sid

    async def _list(self, view: View, kind: ListKind, msg: Message, sid: str | None,
                    session: AggregateSession | None, ctx: LegContext, owner: SessionOwner) -> dict[str, Any]:
        owner_text = _owner_text(owner)
        start = None
        cursor = msg.params.get("cursor")
        if cursor is not None:
            try:
                if not isinstance(cursor, str):
                    raise CursorRefused("invalid cursor")
                start = open_cursor(self.sealer, cursor, method=kind.method, view=view.name, owner=owner_text)
            except CursorRefused:
                raise InvalidCursor("invalid cursor") from None
            if start.server >= len(view.servers):
                raise InvalidCursor("invalid cursor")
        legs = plan(view, start)
        ids = await self._ids(view, sid, session) if session is not None and sid is not None else {}
        base = {k: v for k, v in msg.params.items() if k != "cursor"}
        cursors = {leg.server: leg.cursor for leg in legs}

        async def leg(server: str) -> dict[str, Any]:
            upstream_sid = ids.get(server)
            if session is not None and sid is not None and upstream_sid is None:
                upstream_sid = await self._late_join(server, sid, session, ctx)
            params = dict(base)
            if cursors[server] is not None:
                params["cursor"] = cursors[server]
            return await self._call(server, kind.method, params, ctx, upstream_sid)

        fan = await fan_out([leg.server for leg in legs], leg, leg_timeout=self.settings.leg_timeout,
                            method=kind.method)
        entries, following = assemble(kind, view, legs, fan.answers, owner=owner_text)
        result: dict[str, Any] = {kind.key: entries}
        if following is not None:
            result["nextCursor"] = seal_cursor(self.sealer, following)
        if fan.unavailable:
            result["_meta"] = {UNAVAILABLE_META: fan.unavailable_meta()}
        return result

    # ---- notifications and client answers ------------------------------------------------------

    async def _notify(self, view: View, msg: Message, sid: str, session: AggregateSession,
                      ctx: LegContext) -> None:
        """Fan a client notification out to every upstream session (initialized, cancelled,
        roots/list_changed: a request id is in flight on one upstream at most)."""
        ids = await self._ids(view, sid, session)

        async def leg(server: str) -> int:
            return await self.upstreams.send(server, msg.raw, ctx, session_id=ids[server])

        await fan_out([s for s, u in ids.items() if u is not None], leg,
                      leg_timeout=self.settings.leg_timeout, method=msg.method or "notification")

    async def _client_response(self, request: web.Request, view: View, msg: Message, sid: str | None,
                               owner: SessionOwner) -> None:
        """The client's answer to a server-to-client request: back to the server its id names,
        with the server's own id (Envoy's fast path does the same without this hop)."""
        if sid is None:
            raise BadTransportRequest("a response needs the Mcp-Session-Id of its session")
        session = await self.sessions.open(sid, owner, view.name)
        decoded = decode_request_id(msg.id, view.servers) if isinstance(msg.id, str) else None
        ids = await self._ids(view, sid, session)
        if decoded is None or ids.get(decoded[0]) is None:
            # Nothing here waits for it (the aggregator sends no requests of its own): not an
            # error for the client, as in mcp_servers.core.
            logger.info("ignored an answer to no server's request", extra={"rpc_id": msg.id})
            return
        server, upstream_id = decoded
        ctx = _leg_context(request, session.protocol_version, view)
        await self.upstreams.send(server, {**msg.raw, "id": upstream_id}, ctx, session_id=ids[server])

    # ---- GET / DELETE -----------------------------------------------------------------------------

    async def _get(self, request: web.Request, view: View) -> web.StreamResponse:
        if "text/event-stream" not in media_types(request.headers.get("Accept", "")):
            raise BadTransportRequest("GET needs Accept: text/event-stream", http_status=406)
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None:
            raise BadTransportRequest("GET needs an Mcp-Session-Id header (no GET stream in protocol "
                                      f"{MODERN_VERSION})", http_status=405)
        if not self.ready:
            raise BadTransportRequest("the aggregator is shutting down", http_status=503)
        session = await self.sessions.open(sid, _owner(request), view.name)
        ids = await self._ids(view, sid, session)
        ctx = _leg_context(request, session.protocol_version, view)

        async def join(server: str) -> str | None:
            return await self._late_join(server, sid, session, ctx)

        fan_in = FanIn(self.upstreams, ctx, ids, join, window=self.settings.list_changed_window,
                       backoff=self.settings.stream_backoff, backoff_max=self.settings.stream_backoff_max)
        fan_in.start(view.servers)
        self.fan_ins.append(fan_in)
        closing = asyncio.create_task(self._closing.wait())
        try:
            response = web.StreamResponse(status=200, headers={**SSE_HEADERS, "Mcp-Session-Id": sid})
            await response.prepare(request)
            await response.write(f"retry: {self.settings.sse_retry_ms}\n\n".encode())
            while not self._closing.is_set():
                getter = asyncio.create_task(fan_in.queue.get())
                done, _ = await asyncio.wait({getter, closing}, timeout=self.settings.sse_keepalive,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    if closing in done:
                        break
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(b"event: message\ndata: " + orjson.dumps(getter.result()) + b"\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            logger.info("client disconnected from an aggregate GET stream")
        finally:
            closing.cancel()
            self.fan_ins.remove(fan_in)
            await fan_in.close()
        return response

    async def _delete(self, request: web.Request, view: View) -> web.StreamResponse:
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None:
            raise BadTransportRequest("DELETE needs an Mcp-Session-Id header")
        session = await self.sessions.open(sid, _owner(request), view.name)
        ids = await self._ids(view, sid, session)
        ctx = _leg_context(request, session.protocol_version, view)
        await self.sessions.end(sid)

        async def leg(server: str) -> int:
            upstream_sid = ids[server]
            assert upstream_sid is not None
            return await self.upstreams.delete(server, ctx, upstream_sid)

        await fan_out([s for s, u in ids.items() if u], leg, leg_timeout=self.settings.leg_timeout,
                      method="DELETE")
        logger.info("aggregate session ended by client", extra={"view": view.name})
        return web.Response(status=200)

    async def begin_shutdown(self) -> None:
        self.ready = False
        self._closing.set()


AGGREGATOR_KEY = web.AppKey("mcp_aggregator", Aggregator)


def make_app(settings: AggregatorSettings, facts: SessionFacts | None = None) -> web.Application:
    aggregator = Aggregator(settings, facts)
    app = web.Application(handler_args={"max_field_size": 16384})
    app[AGGREGATOR_KEY] = aggregator
    app.cleanup_ctx.append(aggregator.lifespan)
    if settings.assertion_jwks is not None:
        assert settings.assertion_issuer is not None and settings.assertion_audience is not None
        app.cleanup_ctx.append(identity_context(
            aggregator.identity, settings.assertion_jwks, issuer=settings.assertion_issuer,
            audience=settings.assertion_audience, leeway=DEFAULT_LEEWAY_SECONDS))
    app.router.add_get("/health", aggregator.health)
    app.router.add_get("/ready", aggregator.ready_check)
    add_metrics_route(app)
    for view in settings.views.values():
        app.router.add_route("*", view.path(), aggregator.handler(view))

    async def on_shutdown(_app: web.Application) -> None:
        await aggregator.begin_shutdown()

    app.on_shutdown.append(on_shutdown)
    return app


async def run(settings: AggregatorSettings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then drain: not ready, GET streams end, in-flight
    requests get ``drain_seconds``."""
    stop = stop or stop_event()
    app = make_app(settings)
    # inner_tls: TLS only, reloaded on change; Envoy's certificate only (Prometheus's on GET
    # /metrics).
    tls = inner_tls.server_tls_from_env(callers=inner_tls.ENVOY_ONLY, scraper=True)
    guard_app(app, tls, "aggregator")
    # Handler cancellation: a client that leaves a GET stream ends its upstream streams at once.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=settings.drain_seconds + 1)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port,
                       ssl_context=tls.context if tls is not None else None)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    logger.info("listening", extra={"host": settings.host, "port": port, "upstream_base": settings.base,
                                    "views": sorted(v.path() for v in settings.views.values())})
    try:
        async with inner_tls.watching(tls):
            await stop.wait()
        logger.info("shutting down")
        await app[AGGREGATOR_KEY].begin_shutdown()
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await runner.cleanup()
    logger.info("stopped")
