"""Streamable HTTP on one endpoint: POST, GET and DELETE.

Order of checks on every request: Host and Origin (DNS rebinding), then media types, body size,
strict parsing, protocol version, session, headers against body. Each failure answers with an
HTTP status and a JSON-RPC error, and nothing after it runs.

Two eras share the endpoint:
- 2025-06-18 / 2025-11-25: ``initialize`` creates a session (``MCP-Session-Id``); requests may be
  answered as SSE, on which the server also sends its own requests (sampling, elicitation);
  ``GET`` opens the session's standalone stream; ``DELETE`` ends the session.
- 2026-07-28: no handshake and no session; every request carries its protocol version and client
  capabilities in ``params._meta``, and ``Mcp-Method`` / ``Mcp-Name`` must match the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from gateway.assertion import InvalidAssertion
from gateway.caller import Caller, SessionOwner
from gateway.errors import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
)
from gateway.jsonrpc import Message, best_effort_id, error_response, parse_message, result_response
from gateway.mcp import (
    HANDSHAKE_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    META_CLIENT_CAPABILITIES,
    META_PROTOCOL_VERSION,
    MODERN_VERSION,
    SUPPORTED_HEADER_VERSIONS,
    extract_context,
)
from gateway.telemetry.audit import AuditUnavailable
from gateway.telemetry.logs import bind_request
from gateway.telemetry.tracing import start_server_span
from gateway.wire import (
    CLIENT_ID_HEADER,
    DECISION_ID_HEADER,
    TENANT_HEADER,
    USER_HEADER,
    decode_identity,
)
from mcp_servers.core.context import LOG_OFF, Channel, ToolContext, new_request_id
from mcp_servers.core.errors import (
    BadTransportRequest,
    ClientRequestFailed,
    InvalidParams,
    RequestCancelled,
)
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
from mcp_servers.core.identity import (
    RequestIdentity,
    audit_redact_of,
    check_tool_claim,
    decision_id_of,
    refusal_log,
)
from mcp_servers.core.observe import IS_ERROR, OK, CallRecorder
from mcp_servers.core.server import MCPServer
from mcp_servers.core.session import InFlight, Session, SessionStore
from mcp_servers.core.settings import LOG_LEVELS, ServerSettings
from mcp_servers.core.streams import EventStream, new_token

logger = logging.getLogger(__name__)

ANONYMOUS = SessionOwner(None, None, None)

UNSUPPORTED_PROTOCOL_VERSION = -32022
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
META_LOG_LEVEL = "io.modelcontextprotocol/logLevel"
META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"

# 2026-07-28 maps JSON-RPC error codes onto HTTP statuses; older versions answer errors with 200.
MODERN_ERROR_STATUS = {
    PARSE_ERROR: 400, INVALID_REQUEST: 400, INVALID_PARAMS: 400, HEADER_MISMATCH: 400,
    MISSING_REQUIRED_CLIENT_CAPABILITY: 400, UNSUPPORTED_PROTOCOL_VERSION: 400, METHOD_NOT_FOUND: 404,
}
CACHEABLE_METHODS = frozenset({"server/discover", "tools/list", "prompts/list", "resources/list",
                               "resources/templates/list", "resources/read"})
# Envoy sets x-request-id (a client's own is replaced); the gateway's ext_authz sets the rest.
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_KEY = web.RequestKey("mcp_request_id", str)
MAX_REQUEST_ID_LEN = 128
TRACER = "mcp_servers"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
               "X-Accel-Buffering": "no"}
def identity_value(value: str | None) -> str | None:
    """An identity header's value, decoded (gateway.wire.decode_identity); a spelling the gateway
    never sends is refused (400), so one identity has exactly one form (``%41`` is not ``A``)."""
    try:
        return decode_identity(value)
    except ValueError:
        raise BadTransportRequest("an identity header is not in the gateway's encoding",
                                  code="invalid_identity_header") from None


def _log_value(value: str | None) -> str | None:
    try:
        return identity_value(value)
    except BadTransportRequest:
        return value  # refused in _handle; the log line shows what came


class UnsupportedVersion(GatewayError):
    code = "unsupported_protocol_version"
    rpc_code = UNSUPPORTED_PROTOCOL_VERSION
    http_status = 400


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    session: Session | None
    method: str


def _error(rid: str | int | None, exc: GatewayError, status: int | None = None) -> web.Response:
    return json_response(error_response(rid, exc.to_rpc_error()), status or exc.http_status)


def modern_envelope(msg: Message, header_version: str | None, *,
                    header: bool = True) -> tuple[str, dict[str, Any]]:
    """(protocol version, client capabilities) of a 2026-07-28 request, from ``params._meta``.

    Over HTTP (``header``) the MCP-Protocol-Version header must repeat the version; stdio has no
    headers, so there the envelope alone counts.
    """
    meta = msg.params.get("_meta")
    if not isinstance(meta, dict) or META_PROTOCOL_VERSION not in meta \
            or META_CLIENT_CAPABILITIES not in meta:
        raise InvalidParams(f"params._meta must carry {META_PROTOCOL_VERSION!r} and "
                            f"{META_CLIENT_CAPABILITIES!r} (protocol {MODERN_VERSION})",
                            http_status=400)
    version = meta[META_PROTOCOL_VERSION]
    if header and (header_version is None or header_version != version):
        raise GatewayError("MCP-Protocol-Version header does not match params._meta protocol version",
                           code="header_mismatch", rpc_code=HEADER_MISMATCH, http_status=400)
    if version not in SUPPORTED_HEADER_VERSIONS:
        raise UnsupportedVersion(f"unsupported protocol version {version!r}",
                                 data={"supported": list(SUPPORTED_HEADER_VERSIONS),
                                       "requested": version})
    caps = meta[META_CLIENT_CAPABILITIES]
    if not isinstance(caps, dict):
        raise InvalidParams(f"params._meta[{META_CLIENT_CAPABILITIES!r}] must be an object",
                            http_status=400)
    return version, caps


def handshake_params(params: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(negotiated version, client capabilities, client info) of an ``initialize`` request."""
    requested = params.get("protocolVersion")
    if not isinstance(requested, str):
        raise InvalidParams("params.protocolVersion must be a string", http_status=400)
    caps = params.get("capabilities")
    info = params.get("clientInfo")
    version = requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE_VERSION
    return version, caps if isinstance(caps, dict) else {}, info if isinstance(info, dict) else {}


def request_meta(msg: Message, modern: bool) -> tuple[dict[str, Any], str | None]:
    """(``params._meta``, the request's log level): from 2026-07-28 on, log delivery is the
    request's opt-in (absent: off); before, the session's logging/setLevel decides (None)."""
    meta = msg.params.get("_meta")
    meta = meta if isinstance(meta, dict) else {}
    log_level: str | None = None
    if modern:
        requested_level = meta.get(META_LOG_LEVEL)
        log_level = requested_level if requested_level in LOG_LEVELS else LOG_OFF
    return meta, log_level


def track_inflight(session: Session, rid: str | int, task: asyncio.Task[Any],
                   cancelled: asyncio.Event) -> None:
    """List a session's request as in flight (notifications/cancelled finds it) until it ends."""
    flight = InFlight(task=task, cancelled=cancelled)
    session.inflight[rid] = flight

    def forget(_task: asyncio.Task[Any]) -> None:
        if session.inflight.get(rid) is flight:
            del session.inflight[rid]
        if flight.cancel_timer is not None:
            flight.cancel_timer.cancel()

    task.add_done_callback(forget)


class Transport:
    """The per-application protocol state: sessions, in-flight requests, pending client requests."""

    def __init__(self, server: MCPServer, settings: ServerSettings) -> None:
        self.server = server
        self.settings = settings
        self.sessions = SessionStore(idle_timeout=settings.session_idle_timeout,
                                     max_sessions=settings.max_sessions,
                                     max_buffered_events=settings.max_buffered_events)
        self.pending: dict[str, _Pending] = {}
        self.ready = True
        self.recorder = CallRecorder(server.name)
        # The verifier is installed by the app when assertion_jwks is set (make_app).
        self.identity = RequestIdentity()
        self._allowed_hosts = {h.lower() for h in settings.allowed_hosts}
        self._allowed_origins = {o.lower().rstrip("/") for o in settings.allowed_origins}
        self._background: set[asyncio.Task[Any]] = set()
        self._stateless: set[asyncio.Task[Any]] = set()

    # ---- entry point ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = request.headers
        # Capped: without Envoy in front a client picks this value, and it lands in logs and audit.
        rid = (headers.get(REQUEST_ID_HEADER) or new_token(8))[:MAX_REQUEST_ID_LEN]
        request[REQUEST_ID_KEY] = rid
        # Behind the gateway with assertions: no request goes further without a valid one.
        try:
            asserted = await self.identity.establish(request)
        except InvalidAssertion as exc:
            refusal_log(request, exc)
            return _error(None, exc)
        if asserted is not None:
            who = asserted.caller
            ids = {"decision_id": asserted.decision_id, "sub": who.sub, "tenant": who.tenant,
                   "client_id": who.client_id}
        else:
            ids = {"decision_id": headers.get(DECISION_ID_HEADER),
                   "sub": _log_value(headers.get(USER_HEADER)),
                   "tenant": _log_value(headers.get(TENANT_HEADER)),
                   "client_id": _log_value(headers.get(CLIENT_ID_HEADER))}
        # Every log line of this request (handlers included) carries these ids and the trace ids.
        with bind_request(request_id=rid, **ids):
            if request.method == "POST":
                # The parent is Envoy's span (W3C traceparent), joining this server to the trace.
                with start_server_span("mcp", headers, tracer_name=TRACER,
                                       attributes={"mcp.server": self.server.name}) as span:
                    response = await self._handle(request)
                    span.set_attribute("http.response.status_code", response.status)
                    if response.status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                    return response
            return await self._handle(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_host_and_origin(request)
            if request.method == "POST":
                return await self._post(request)
            if request.method == "GET":
                return await self._get(request)
            if request.method == "DELETE":
                return await self._delete(request)
            raise method_not_allowed(request.method)
        except GatewayError as exc:
            logger.info("rejected %s: %s", request.method, exc.message,
                        extra={"reason": exc.code, "status": exc.http_status})
            response = _error(None, exc)
            if exc.http_status == 405:
                response.headers["Allow"] = ALLOWED_METHODS
            return response

    def _check_host_and_origin(self, request: web.Request) -> None:
        check_host_and_origin(request, self._allowed_hosts, self._allowed_origins)

    @staticmethod
    def _caller(request: web.Request) -> Caller | None:
        return request_caller(request)

    @staticmethod
    def _owner(caller: Caller | None) -> SessionOwner:
        # Without a gateway in front every caller is the same anonymous owner.
        return caller.owner if caller is not None else ANONYMOUS

    # ---- POST -----------------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        _, sse_ok = post_media(request)
        try:
            body = await read_body(request, self.settings.max_body_bytes)
        except PayloadTooLarge as exc:
            response = _error(None, exc)
            response.force_close()
            return response
        try:
            msg = parse_message(body, max_bytes=self.settings.max_body_bytes,
                                max_depth=self.settings.max_depth)
        except GatewayError as exc:
            return _error(best_effort_id(body), exc)
        if msg.method is not None:
            span = trace.get_current_span()
            span.update_name(msg.method)
            span.set_attribute("mcp.method", msg.method)
        try:
            return await self._post_message(request, msg, sse_ok=sse_ok)
        except GatewayError as exc:
            return _error(msg.id, exc)

    async def _post_message(self, request: web.Request, msg: Message, *, sse_ok: bool) -> web.StreamResponse:
        caller = self._caller(request)
        header_version = request.headers.get("MCP-Protocol-Version")
        if header_version is not None and header_version not in SUPPORTED_HEADER_VERSIONS:
            raise UnsupportedVersion(f"unsupported MCP-Protocol-Version {header_version!r}",
                                     data={"supported": list(SUPPORTED_HEADER_VERSIONS),
                                           "requested": header_version})
        sid = request.headers.get("Mcp-Session-Id")
        if msg.kind == "response":
            owner = self._owner(caller)
            self.client_response(msg, self.sessions.get(sid, owner) if sid is not None else None)
            return web.Response(status=202)
        mcp_ctx = extract_context(msg, request.headers)  # param types + Mcp-Method/Mcp-Name vs body
        if msg.method == "tools/call":
            check_tool_claim(request, mcp_ctx.tool)
        if mcp_ctx.tool is not None:
            span = trace.get_current_span()
            span.update_name(f"{msg.method} {mcp_ctx.tool}")
            span.set_attribute("mcp.tool", mcp_ctx.tool)
        if msg.method == "initialize":
            if msg.kind != "request":
                raise InvalidRequest("initialize must be a request with an id")
            return await self._initialize(msg, caller, self._owner(caller))
        session: Session | None = None
        modern = False
        if sid is not None:
            session = self.sessions.get(sid, self._owner(caller))
            version = header_version or session.protocol_version
            capabilities = session.client_capabilities
        elif mcp_ctx.protocol_version is not None and mcp_ctx.protocol_version >= MODERN_VERSION:
            modern = True
            if msg.kind == "notification":
                # 2026-07-28 defines no client-to-server notifications on this wire; cancellation is
                # closing the response stream.
                return web.Response(status=202)
            version, capabilities = modern_envelope(msg, header_version)
        elif msg.method == "server/discover" and msg.kind == "request":
            version = header_version or LATEST_HANDSHAKE_VERSION
            capabilities = {}
        else:
            raise BadTransportRequest("missing Mcp-Session-Id header: send initialize first, or use "
                                      f"protocol {MODERN_VERSION} with params._meta on every request",
                                      code="session_required")
        if msg.kind == "notification":
            await self.notification(msg, session)
            return web.Response(status=202)
        if session is not None and not session.initialized and msg.method not in ("ping",):
            # Clients send notifications/initialized first; SDKs racing it are tolerated.
            session.initialized = True
        return await self._run_request(request, msg, session=session, version=version, modern=modern,
                                       caller=caller, capabilities=capabilities, sse_ok=sse_ok)

    async def _initialize(self, msg: Message, caller: Caller | None, owner: SessionOwner
                          ) -> web.Response:
        version, caps, info = handshake_params(msg.params)
        session = await self.sessions.create(owner=owner, protocol_version=version,
                                             client_capabilities=caps, client_info=info)
        logger.info("session created", extra={"session": session.id[:8], "protocol_version": version,
                                               "user": caller.sub if caller else None})
        return json_response(result_response(msg.id, self.server.initialize_result(version)),
                     headers={"Mcp-Session-Id": session.id})

    async def notification(self, msg: Message, session: Session | None) -> None:
        """A client notification: ``initialized`` and ``cancelled`` act on ``session``."""
        if msg.method == "notifications/initialized" and session is not None:
            session.initialized = True
        elif msg.method == "notifications/cancelled" and session is not None:
            rid = msg.params.get("requestId")
            flight = session.inflight.get(rid) if isinstance(rid, (str, int)) else None
            if flight is not None:
                flight.cancelled.set()
                loop = asyncio.get_running_loop()
                flight.cancel_timer = loop.call_later(self.settings.cancel_grace, flight.task.cancel)
                logger.info("request cancelled by client", extra={"rpc_id": rid})

    def client_response(self, msg: Message, session: Session | None) -> None:
        """The client's answer to a server request (sampling, elicitation) wakes its waiter."""
        rid = msg.id
        pending = self.pending.get(rid) if isinstance(rid, str) else None
        if pending is None or pending.session is not session or pending.future.done():
            # Late (after a timeout) or unknown: nothing waits for it. Not an error for the client.
            logger.info("ignored a response to an unknown or finished server request", extra={"rpc_id": rid})
            return
        if "error" in msg.raw:
            err = msg.raw["error"]
            pending.future.set_exception(ClientRequestFailed(
                f"the client answered {pending.method} with error {err.get('code')}: {err.get('message')}",
                err))
        else:
            result = msg.raw.get("result")
            pending.future.set_result(result if isinstance(result, dict) else {})

    async def _run_request(self, request: web.Request, msg: Message, *, session: Session | None,
                           version: str, modern: bool, caller: Caller | None, capabilities: dict[str, Any],
                           sse_ok: bool) -> web.StreamResponse:
        assert msg.method is not None
        rid = msg.id
        assert rid is not None
        if session is not None and sse_ok:
            stream = session.new_stream()
        else:
            stream = EventStream(max_buffered=self.settings.max_buffered_events)
        fallback = session.standalone if session is not None and not sse_ok else None
        channel = Channel(stream, sse_allowed=sse_ok, fallback=fallback, back_channel=not modern)
        meta, log_level = request_meta(msg, modern)
        cancelled = asyncio.Event()
        ctx = ToolContext(request_id=msg.id, caller=caller, protocol_version=version, session=session,
                          client_capabilities=capabilities, channel=channel, hooks=self, meta=meta,
                          log_level=log_level, cancelled=cancelled,
                          http_request_id=request.get(REQUEST_ID_KEY),
                          decision_id=decision_id_of(request),
                          audit_redact=audit_redact_of(request))
        task = asyncio.create_task(self.answer(msg, ctx, modern))
        if session is not None:
            track_inflight(session, rid, task, cancelled)
        else:
            self._stateless.add(task)
            task.add_done_callback(self._stateless.discard)
        first = asyncio.create_task(stream.wait_first())
        try:
            await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            first.cancel()
        headers = {"Mcp-Session-Id": session.id} if session is not None else {}
        if task.done() and not stream.has_events:
            if task.cancelled() or cancelled.is_set():
                return _error(msg.id, RequestCancelled("request cancelled"))
            body, status = task.result()
            return json_response(body, status, headers)
        finisher = asyncio.create_task(self._finish_stream(task, stream, cancelled))
        self._background.add(finisher)
        finisher.add_done_callback(self._background.discard)
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        resumable = session is not None
        if resumable:
            await response.write(f"id: {stream.event_id(0)}\nretry: {self.settings.sse_retry_ms}\n"
                                 "data: \n\n".encode())
        delivered = await self._pump(response, stream, 0)
        if not delivered and not resumable and not task.done():
            # 2026-07-28: closing the response stream is how a client cancels.
            cancelled.set()
            task.cancel()
        return response

    async def _finish_stream(self, task: asyncio.Task[tuple[dict[str, Any], int]],
                             stream: EventStream, cancelled: asyncio.Event) -> None:
        try:
            body, _status = await task
        except asyncio.CancelledError:
            body = None
        # A cancelled request gets no answer on its stream: the client already moved on.
        if body is not None and not cancelled.is_set():
            await stream.publish(body)
        await stream.finish()

    async def _pump(self, response: web.StreamResponse, stream: EventStream, after: int) -> bool:
        """Copy stream events to the HTTP response; False if the client went away."""
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
            logger.info("client disconnected from an SSE stream", extra={"stream": stream.id})
            return False
        return True

    async def answer(self, msg: Message, ctx: ToolContext, modern: bool) -> tuple[dict[str, Any], int]:
        """The answer to one request, released only after its result is counted and audited."""
        assert msg.method is not None
        started = time.perf_counter()
        try:
            body, http_status, outcome = await self._dispatch(msg, ctx, modern)
        except asyncio.CancelledError:
            self.recorder.cancelled(msg.method, msg.params, ctx, time.perf_counter() - started)
            raise
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("mcp.outcome", outcome)
            if outcome != OK and outcome != IS_ERROR:
                span.set_status(Status(StatusCode.ERROR, outcome))
        try:
            await self.recorder.finish(msg.method, msg.params, ctx, outcome, time.perf_counter() - started)
        except AuditUnavailable as exc:
            # Fail closed: a result whose audit entry may be lost is never released.
            logger.error("withholding the answer to %s: %s", msg.method, exc.message)
            return error_response(msg.id, exc.to_rpc_error()), exc.http_status
        return body, http_status

    async def _dispatch(self, msg: Message, ctx: ToolContext,
                        modern: bool) -> tuple[dict[str, Any], int, str]:
        """(JSON-RPC answer, HTTP status, outcome): ok, is_error or the error's code."""
        assert msg.method is not None
        try:
            result = await self.server.dispatch(msg.method, msg.params, ctx, self.settings.page_size)
        except GatewayError as exc:
            status = MODERN_ERROR_STATUS.get(exc.rpc_code, 200) if modern else 200
            err = exc.to_rpc_error()
            if modern and err["code"] == -32002:
                # -32002 is retired from 2026-07-28 on; a missing resource is invalid params there.
                err["code"] = INVALID_PARAMS
                status = 400
            return error_response(msg.id, err), status, exc.code
        except ClientRequestFailed as exc:
            return (error_response(msg.id, {"code": INVALID_REQUEST, "message": exc.message}), 200,
                    "client_request_failed")
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - top-level handler of one request: log, answer, live on.
            logger.exception("internal error answering %s", msg.method)
            internal = {"code": -32603, "message": "internal error"}
            return error_response(msg.id, internal), 200, "internal_error"
        outcome = IS_ERROR if result.get("isError") is True else OK
        if modern:
            result = {**result}
            result.setdefault("resultType", "complete")
            if msg.method in CACHEABLE_METHODS:
                # SEP-2549: required on these results; 0 + private never lets a cache share them.
                result.setdefault("ttlMs", 0)
                result.setdefault("cacheScope", "private")
            meta = result.get("_meta")
            result["_meta"] = {**(meta if isinstance(meta, dict) else {}),
                               META_SERVER_INFO: self.server.server_info()}
        return result_response(msg.id, result), 200, outcome

    # ---- GET / DELETE ---------------------------------------------------------------------------

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if "text/event-stream" not in media_types(request.headers.get("Accept", "")):
            raise BadTransportRequest("GET needs Accept: text/event-stream", http_status=406)
        sid = request.headers.get("Mcp-Session-Id")
        if sid is None:
            raise BadTransportRequest("GET needs an Mcp-Session-Id header (no GET stream in protocol "
                                      f"{MODERN_VERSION})", http_status=405)
        session = self.sessions.get(sid, self._owner(self._caller(request)))
        last = request.headers.get("Last-Event-ID")
        found = session.find_stream(last) if last else None
        if found is not None:
            stream, after = found
        else:
            stream, after = session.standalone_stream(), 0
        if stream.attached:
            raise BadTransportRequest("this stream already has a listener", http_status=409)
        if not self.ready and stream.standalone:
            raise BadTransportRequest("server is shutting down", http_status=503)
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
        session = self.sessions.get(sid, self._owner(self._caller(request)))
        await self.sessions.remove(session)
        logger.info("session ended by client", extra={"session": session.id[:8]})
        return web.Response(status=200)

    # ---- ServerHooks (used by ToolContext) -------------------------------------------------------

    async def client_request(self, channel: Channel, session: Session | None, method: str,
                             params: dict[str, Any]) -> dict[str, Any]:
        if not channel.can_request:
            raise ClientRequestFailed(
                f"cannot send {method}: this exchange has no back-channel to the client "
                "(needs protocol 2025-06-18/2025-11-25 and Accept: text/event-stream)")
        rid = new_request_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = _Pending(future=future, session=session, method=method)
        try:
            await channel.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
            return await asyncio.wait_for(future, self.settings.client_request_timeout)
        except TimeoutError:
            raise ClientRequestFailed(f"the client did not answer {method} within "
                                      f"{self.settings.client_request_timeout:g} s") from None
        finally:
            self.pending.pop(rid, None)

    async def resource_updated(self, uri: str, origin: Session | None, channel: Channel) -> None:
        message = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}
        for session in self.sessions.all():
            if uri in session.subscriptions:
                if session is origin:
                    await channel.send(message)
                else:
                    await session.standalone_stream().publish(message)

    async def list_changed(self, kind: str, origin: Session | None, channel: Channel) -> None:
        message = {"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"}
        if origin is not None:
            await channel.send(message)
        await self.broadcast(message, exclude=origin)

    async def broadcast(self, message: dict[str, Any], exclude: Session | None = None) -> None:
        """Send a notification to every session's standalone stream."""
        for session in self.sessions.all():
            if session is not exclude:
                await session.standalone_stream().publish(message)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def begin_shutdown(self) -> None:
        """Stop being ready and close standalone streams; in-flight requests keep running."""
        self.ready = False
        for session in self.sessions.all():
            if session.standalone is not None:
                await session.standalone.finish()

    async def close(self) -> None:
        for task in list(self._stateless) + list(self._background):
            task.cancel()
        await self.sessions.close_all()
