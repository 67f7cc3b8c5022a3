"""The Envoy ``envoy.service.ext_proc.v3.ExternalProcessor`` servicer (grpc.aio).

One bidi stream per HTTP request, opened by the response headers (request headers are SKIPped:
every stream message costs ext_proc ~0.3 ms of CPU, and Envoy forwards ext_authz's dynamic
metadata, the caller context, on each message anyway). The response headers carry that context
and decide whether and how the body is inspected (``mode_override``: BUFFERED for JSON, STREAMED
for SSE); body messages are transformed by ``ext_proc.inspect``. A request-headers message (an
Envoy config that still sends them) is answered too.

Fail closed: any error, a timeout or an oversized body ends the exchange with an
ImmediateResponse carrying a JSON-RPC error. Otherwise the stream is left only once the answer is
complete (the last body chunk, or response headers that need no inspection, answered), never
earlier, because Envoy treats a cleanly closed stream as "continue unprocessed": after that point
nothing is left to process (trailers are not sent to ext_proc). Ending it there rather than
waiting for Envoy's half-close matters for memory: Envoy resets most streams instead of
half-closing them, and a grpc.aio server whose handler is cancelled with a read outstanding leaks
that read's native batch (grpc/grpc#43360, ~130 B per stream, unbounded). Writes are shielded
for the same reason (``Process``); the numbers are in README.md.

Observability: every log line written while a stream's message is handled carries that stream's
ids (request, decision, caller, server, method, tool), and each stream is one ``ext_proc.process``
span in the request's trace. Both are bound per message, not per stream, so nothing bound for one
stream is ever visible between its messages (grpc.aio's task, or a test driving several
generators from one task, runs other code there).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ext_proc import response as out
from ext_proc.errors import (
    InspectionError,
    InspectionTimeout,
    MetadataMissing,
    ResponseTooLarge,
    UnsupportedContent,
)
from ext_proc.inspect import NOTHING, Inspector, Plan, SseInspector, listed_count, loads_response
from ext_proc.metadata import CallerContext, parse_caller_context
from ext_proc.settings import Settings
from gateway.errors import GatewayError
from gateway.telemetry import bind, extract_context, get_tracer, metrics, unbind
from gateway.telemetry.metrics import MASKED_VALUES

logger = logging.getLogger(__name__)

_JSON = "application/json"
_SSE = "text/event-stream"
_TRACE_HEADERS = ("traceparent", "tracestate")
SPAN_NAME = "ext_proc.process"
# Envoy's ``response_attributes`` (CEL expressions, evaluated on the request's stream and sent
# with the response headers under the filter's name): the request's id and trace context, as no
# request-headers message brings them.
ATTRIBUTES_NAMESPACE = "envoy.filters.http.ext_proc"
REQUEST_ID_ATTRIBUTE = "request.id"
TRACEPARENT_ATTRIBUTE = "request.headers['traceparent']"
# Only a POST's answer is the answer to the JSON-RPC message ext_authz parsed: any other method
# (a GET whose body holds a "ping" still replays the session's stream) is inspected by shape.
METHOD_ATTRIBUTE = "request.method"
RESPONSE_ATTRIBUTES = (REQUEST_ID_ATTRIBUTE, TRACEPARENT_ATTRIBUTE, METHOD_ATTRIBUTE)


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Lower-cased header names -> values (Envoy sends ``raw_value`` bytes, older ones ``value``)."""
    result: dict[str, str] = {}
    for h in headers.headers.headers:
        result[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return result


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def grpc_trace_headers(context: Any) -> dict[str, str]:
    """The W3C trace context in the call's gRPC metadata: Envoy's span for this ext_proc call."""
    if context is None:
        return {}
    return {k: v for k, v in (context.invocation_metadata() or ())
            if k in _TRACE_HEADERS and isinstance(v, str)}


def request_ids(req: pb.ProcessingRequest) -> tuple[dict[str, str], str | None]:
    """The HTTP request's trace context and ``x-request-id``: from the response attributes, or
    from the headers of a request-headers message (a config that still sends them)."""
    trace_headers: dict[str, str] = {}
    request_id = None
    kind = req.WhichOneof("request")
    if kind == "request_headers":
        for h in req.request_headers.headers.headers:
            key = h.key.lower()
            if key == "x-request-id" or key in _TRACE_HEADERS:
                value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                if key == "x-request-id":
                    request_id = value
                else:
                    trace_headers[key] = value
    elif kind == "response_headers" and ATTRIBUTES_NAMESPACE in req.attributes:
        fields = req.attributes[ATTRIBUTES_NAMESPACE].fields
        request_id = _text(fields, REQUEST_ID_ATTRIBUTE)
        traceparent = _text(fields, TRACEPARENT_ATTRIBUTE)
        if traceparent:
            trace_headers["traceparent"] = traceparent
    return trace_headers, request_id


def http_method(req: pb.ProcessingRequest) -> str | None:
    """The HTTP request's method: the response attribute, or a request-headers message's
    ``:method``; None when neither is there (a config without the attribute)."""
    kind = req.WhichOneof("request")
    if kind == "request_headers":
        for h in req.request_headers.headers.headers:
            if h.key == ":method":
                value: str = h.raw_value.decode("ascii", "replace") if h.raw_value else h.value
                return value
    elif kind == "response_headers" and ATTRIBUTES_NAMESPACE in req.attributes:
        return _text(req.attributes[ATTRIBUTES_NAMESPACE].fields, METHOD_ATTRIBUTE)
    return None


def _text(fields: Any, name: str) -> str | None:
    # An attribute Envoy could not evaluate (e.g. the header is absent) is left out or not a string.
    if name not in fields or fields[name].WhichOneof("kind") != "string_value":
        return None
    return fields[name].string_value or None


class Exchange:
    """The state of one HTTP request's processing stream."""

    def __init__(self, inspector: Inspector, settings: Settings) -> None:
        self._inspector = inspector
        self._settings = settings
        self.ctx: CallerContext | None = None
        self.plan: Plan = NOTHING
        self.mode: str | None = None  # "json" | "sse" once the body is being inspected
        self._body = bytearray()
        self._sse: SseInspector | None = None
        self.counts: Counter[str] = Counter()
        self.filtered = 0  # list items removed
        self.request_id: str | None = None  # x-request-id, until ext_authz's metadata says
        self.http_method: str | None = None
        self.error_code: str | None = None  # the fail-closed code once the answer is withheld
        self.cancelled = False
        self.complete = False  # the whole answer went through (or needed no inspection)
        self._fields: dict[str, str | None] | None = None

    def log_fields(self) -> dict[str, str | None]:
        """What every log line of this stream carries (more once the caller context is known)."""
        ctx = self.ctx
        if ctx is None:
            return {"request_id": self.request_id}
        if self._fields is None:
            self._fields = {"request_id": ctx.request_id or self.request_id,
                            "decision_id": ctx.decision_id, "sub": ctx.caller.sub,
                            "tenant": ctx.caller.tenant,
                            "server": ctx.server, "method": ctx.mcp_method, "tool": ctx.tool}
        return self._fields

    def outcome(self) -> str:
        if self.error_code is not None:
            return "withheld"
        if self.cancelled or not self.complete:
            return "cancelled"  # reset, or closed by Envoy before the answer was through
        if self.mode is None:
            return "passed"
        if self.plan.list_spec is not None:
            return "filtered"
        return "masked" if self.plan.masker is not None else "filtered"

    def _context(self, req: pb.ProcessingRequest) -> CallerContext:
        if self.ctx is None:
            if not req.HasField("metadata_context"):
                raise MetadataMissing("no metadata from ext_authz: the caller context is unknown")
            ctx = parse_caller_context(req.metadata_context.filter_metadata)
            if self.http_method not in (None, "POST") and ctx.mcp_method is not None:
                # Whatever JSON-RPC the body of a GET or DELETE held, the server does not answer
                # it: the answer is the session's stream.
                ctx = dataclasses.replace(ctx, mcp_method=None)
            self.ctx = ctx
        return self.ctx

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if req.WhichOneof("request") == "response_body":
            return await self._response_body(req.response_body, self._context(req))
        return self.answer(req)

    def answer(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """The answer to any message but a response body: none of them needs to wait."""
        kind = req.WhichOneof("request")
        if kind == "response_headers":
            return self._response_headers(req, self._context(req))
        if kind == "request_headers":  # SKIPped in the rendered config; harmless if sent
            self._context(req)
            return out.continue_request_headers()
        if kind == "request_body":
            return out.continue_request_body()  # not configured; requests are ext_authz's job
        if kind in ("request_trailers", "response_trailers"):
            return out.continue_trailers(kind == "response_trailers")
        raise InspectionError(f"unexpected processing request {kind!r}")

    def _response_headers(self, req: pb.ProcessingRequest, ctx: CallerContext) -> pb.ProcessingResponse:
        self.plan = self._inspector.plan(ctx)
        if not self.plan.inspects or req.response_headers.end_of_stream:
            self.complete = True
            return out.continue_response_headers()
        headers = header_map(req.response_headers)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise UnsupportedContent(f"cannot inspect a {encoding}-encoded answer",
                                     data={"content_encoding": encoding})
        kind = media_type(headers.get("content-type"))
        if kind == _JSON:
            self.mode = "json"
            return out.inspect_response_body(out.BUFFERED)
        if kind == _SSE:
            self.mode = "sse"
            self._sse = SseInspector(self._transform, max_buffer=self._settings.max_sse_event_bytes)
            return out.inspect_response_body(out.STREAMED)
        raise UnsupportedContent(f"cannot inspect a {kind or 'untyped'} answer to "
                                 f"{ctx.mcp_method or 'a request without a method'}",
                                 data={"content_type": kind})

    async def _transform(self, msg: Any) -> dict[str, Any]:
        assert self.ctx is not None
        result, counts = await self._inspector.transform(msg, self.ctx, self.plan)
        if self.plan.filters:
            self.filtered += listed_count(msg) - listed_count(result)
        if counts:
            self.counts.update(counts)
            for kind, n in counts.items():
                MASKED_VALUES.labels(kind).inc(n)
        return result

    async def _response_body(self, body: pb.HttpBody, ctx: CallerContext) -> pb.ProcessingResponse:
        resp = await self._body_answer(body, ctx)
        self.complete = body.end_of_stream
        return resp

    async def _body_answer(self, body: pb.HttpBody, ctx: CallerContext) -> pb.ProcessingResponse:
        if self.mode == "sse":
            assert self._sse is not None
            data = await self._sse.feed(body.body)
            if body.end_of_stream:
                self._sse.close()
                if self._sse.dropped_tail:
                    logger.warning("dropped an unterminated last SSE event (decision %s)",
                                   ctx.decision_id)
            return out.replace_body(data)
        if self.mode == "json":
            self._body += body.body
            if len(self._body) > self._settings.max_body_bytes:
                raise ResponseTooLarge(f"the answer exceeds {self._settings.max_body_bytes} bytes",
                                       data={"limit": self._settings.max_body_bytes})
            if not body.end_of_stream:
                return out.replace_body(b"")  # held back until the whole answer is inspected
            msg = await self._transform(loads_response(bytes(self._body)))
            self._body = bytearray()
            return out.replace_body(orjson.dumps(msg))
        if self.plan.inspects:
            raise InspectionError("a response body arrived before its headers were inspected")
        return out.continue_response_body()


class ExternalProcessorServicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # untyped stubs
    """``tracing``: spans are exported (setup_tracing succeeded). Without it a span is only made
    when the call carries a trace context, for the trace id on log lines."""

    def __init__(self, settings: Settings, inspector: Inspector, *, tracing: bool = False) -> None:
        self._settings = settings
        self._inspector = inspector
        self._tracing = tracing

    async def Process(self, request_iterator: object, context: Any) -> None:
        """The gRPC entry point: ``process`` over grpc.aio's reader/writer API.

        Not an async generator handler, because grpc.aio then sends each answer from its own
        task: Envoy often resets the stream right after reading the last answer, grpc.aio cancels
        that task, and a send whose completion loses that race never frees its copy of the
        message (grpc/grpc#43360; the 10 KB masked answers made ext_proc grow without bound).
        Here each write is shielded, so it always completes and frees what it holds. Reads are
        ``context.read()`` (the request iterator is not used: the two must not be mixed).
        """
        # Both generators are closed here: one left to the garbage collector costs a wake-up of
        # the event loop and a task (asyncio's async-generator finalizer) per stream.
        async with contextlib.aclosing(_reads(context)) as reads, \
                contextlib.aclosing(self.process(reads, context)) as answers:
            async for resp in answers:
                await _write(context, resp)

    async def process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: Any) -> AsyncGenerator[pb.ProcessingResponse, None]:
        """One exchange: an answer for each message, until the answer is complete or withheld."""
        exchange = Exchange(self._inspector, self._settings)
        span: Span | None = None
        first = True
        try:
            async for req in request_iterator:
                if first:
                    first = False
                    trace_headers, exchange.request_id = request_ids(req)
                    exchange.http_method = http_method(req)
                    span = self._start_span(grpc_trace_headers(context) or trace_headers)
                resp, done = await self._step(exchange, req, span)
                yield resp
                if done:
                    return
        except (asyncio.CancelledError, GeneratorExit):  # Envoy reset the stream, or gRPC left it
            exchange.cancelled = True
            raise
        finally:
            if not first:  # a stream that carried a message
                metrics.EXT_PROC_STREAMS.labels(exchange.outcome()).inc()
            if span is not None:
                _end_span(span, exchange)
            if logger.isEnabledFor(logging.DEBUG):
                tokens = _enter(exchange, span)
                try:
                    logger.debug("stream ended: %s (masked %d, filtered %d)", exchange.outcome(),
                                 sum(exchange.counts.values()), exchange.filtered)
                finally:
                    _leave(tokens)

    def _start_span(self, trace_headers: dict[str, str]) -> Span | None:
        # Without an exporter and without a caller's trace there is nothing a span could add
        # (no ids for log lines either): skip its cost.
        if not self._tracing and not trace_headers:
            return None
        return get_tracer(__name__).start_span(SPAN_NAME, context=extract_context(trace_headers),
                                               kind=SpanKind.SERVER)

    async def _step(self, exchange: Exchange, req: pb.ProcessingRequest, span: Span | None
                    ) -> tuple[pb.ProcessingResponse, bool]:
        """One message's answer, and whether it ends the exchange (an ImmediateResponse, or the
        answer is complete: Envoy has nothing left to send that needs processing)."""
        timeout = self._settings.message_timeout_seconds
        known = exchange.ctx is not None
        tokens = _enter(exchange, span)
        try:
            try:
                if req.WhichOneof("request") != "response_body":
                    # Headers and trailers are answered without ever suspending, so a timeout
                    # could not interrupt them anyway: skip arming one.
                    return exchange.answer(req), exchange.complete
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(timeout):
                        return await exchange.handle(req), exchange.complete
                finally:
                    metrics.EXT_PROC_BODY_LATENCY.observe(time.perf_counter() - started)
            except GatewayError as err:  # SseError included
                failure = err
            except TimeoutError:
                failure = InspectionTimeout(f"inspection took longer than {timeout * 1000:.0f} ms")
            except Exception:  # top-level handler: whatever broke, the answer is withheld
                known = _rebind(exchange, known)
                logger.exception("ext_proc failed; withholding the answer (decision %s)",
                                 exchange.ctx.decision_id if exchange.ctx else None)
                failure = InspectionError("internal error in response inspection")
            _rebind(exchange, known)
            return self._fail(exchange, failure), True
        finally:
            _leave(tokens)

    @staticmethod
    def _fail(exchange: Exchange, err: GatewayError) -> pb.ProcessingResponse:
        ctx = exchange.ctx
        exchange.error_code = err.code
        metrics.EXT_PROC_FAILURES.labels(err.code).inc()
        data = err.data if isinstance(err.data, dict) else {}
        if ctx is not None:
            err.data = {**data, "decision_id": ctx.decision_id}
        logger.warning("response withheld: %s (%s) method=%s server=%s decision=%s", err.code,
                       err.message, ctx.mcp_method if ctx else None, ctx.server if ctx else None,
                       ctx.decision_id if ctx else None)
        return out.immediate_error(err)


async def _reads(context: Any) -> AsyncGenerator[pb.ProcessingRequest, None]:
    while True:
        req = await context.read()
        if req is grpc.aio.EOF:
            return
        yield req


def _retrieve(write: asyncio.Future[None]) -> None:
    # Nobody awaits a write whose stream was cancelled: its failure is expected, not news.
    if not write.cancelled():
        write.exception()


async def _write(context: Any, resp: pb.ProcessingResponse) -> None:
    """Send one answer; cancelling the caller never cancels the send itself (see Process)."""
    write = asyncio.ensure_future(context.write(resp))
    write.add_done_callback(_retrieve)
    await asyncio.shield(write)


def _enter(exchange: Exchange, span: Span | None) -> tuple[Any, Any]:
    """Make the stream's log fields and span current for one message; undo with ``_leave``.

    Two plain calls rather than a context manager: this runs for every message, and a
    generator-based one costs an object and two frames more each time.
    """
    token = bind(**exchange.log_fields())
    span_token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
    return token, span_token


def _leave(tokens: tuple[Any, Any]) -> None:
    token, span_token = tokens
    if span_token is not None:
        otel_context.detach(span_token)
    unbind(token)


def _rebind(exchange: Exchange, known: bool) -> bool:
    """Add the caller context parsed during this message; ``_leave`` undoes it too."""
    if not known and exchange.ctx is not None:
        bind(**exchange.log_fields())
        return True
    return known


def _end_span(span: Span, exchange: Exchange) -> None:
    if span.is_recording():
        ctx = exchange.ctx
        span.set_attributes({
            "mcp.method": (ctx.mcp_method if ctx else None) or "",
            "mcp.tool": (ctx.tool if ctx else None) or "",
            "mcp.server": ctx.server if ctx else "", "decision.id": ctx.decision_id if ctx else "",
            "ext_proc.outcome": exchange.outcome(),
            "ext_proc.masked_values": sum(exchange.counts.values()),
            "ext_proc.filtered_items": exchange.filtered})
        if exchange.error_code is not None:
            span.set_attribute("error.type", exchange.error_code)
            span.set_status(Status(StatusCode.ERROR, exchange.error_code))
    span.end()
