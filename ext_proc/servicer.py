"""The Envoy ``envoy.service.ext_proc.v3.ExternalProcessor`` servicer (grpc.aio).

One bidi stream per HTTP request. Request headers carry the caller context (ext_authz's dynamic
metadata); response headers decide whether and how the body is inspected (``mode_override``:
BUFFERED for JSON, STREAMED for SSE); body messages are transformed by ``ext_proc.inspect``.

Fail closed: any error, a timeout or an oversized body ends the exchange with an
ImmediateResponse carrying a JSON-RPC error. The stream is only ever left by answering every
message or by such an ImmediateResponse, never by closing it early, because Envoy treats a
cleanly closed stream as "continue unprocessed".
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ext_proc import response as out
from ext_proc.errors import (
    InspectionError,
    InspectionTimeout,
    MetadataMissing,
    ResponseTooLarge,
    UnsupportedContent,
)
from ext_proc.inspect import NOTHING, Inspector, Plan, SseInspector, loads_response
from ext_proc.metadata import CallerContext, parse_caller_context
from ext_proc.settings import Settings
from gateway.errors import GatewayError
from gateway.telemetry.metrics import MASKED_VALUES

logger = logging.getLogger(__name__)

_JSON = "application/json"
_SSE = "text/event-stream"


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Lower-cased header names -> values (Envoy sends ``raw_value`` bytes, older ones ``value``)."""
    result: dict[str, str] = {}
    for h in headers.headers.headers:
        result[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return result


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


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

    def _context(self, req: pb.ProcessingRequest) -> CallerContext:
        if self.ctx is None:
            if not req.HasField("metadata_context"):
                raise MetadataMissing("no metadata from ext_authz: the caller context is unknown")
            self.ctx = parse_caller_context(req.metadata_context.filter_metadata)
        return self.ctx

    async def handle(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        kind = req.WhichOneof("request")
        if kind == "request_headers":
            self._context(req)
            return out.continue_request_headers()
        if kind == "response_headers":
            return self._response_headers(req, self._context(req))
        if kind == "response_body":
            return await self._response_body(req.response_body, self._context(req))
        if kind == "request_body":
            return out.continue_request_body()  # not configured; requests are ext_authz's job
        if kind in ("request_trailers", "response_trailers"):
            return out.continue_trailers(kind == "response_trailers")
        raise InspectionError(f"unexpected processing request {kind!r}")

    def _response_headers(self, req: pb.ProcessingRequest, ctx: CallerContext) -> pb.ProcessingResponse:
        self.plan = self._inspector.plan(ctx)
        if not self.plan.inspects or req.response_headers.end_of_stream:
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
        raise UnsupportedContent(f"cannot inspect a {kind or 'untyped'} answer to {ctx.mcp_method}",
                                 data={"content_type": kind})

    async def _transform(self, msg: Any) -> dict[str, Any]:
        assert self.ctx is not None
        result, counts = await self._inspector.transform(msg, self.ctx, self.plan)
        if counts:
            self.counts.update(counts)
            for kind, n in counts.items():
                MASKED_VALUES.labels(kind).inc(n)
        return result

    async def _response_body(self, body: pb.HttpBody, ctx: CallerContext) -> pb.ProcessingResponse:
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
    def __init__(self, settings: Settings, inspector: Inspector) -> None:
        self._settings = settings
        self._inspector = inspector

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: Any) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = Exchange(self._inspector, self._settings)
        timeout = self._settings.message_timeout_seconds
        async for req in request_iterator:
            try:
                async with asyncio.timeout(timeout):
                    resp = await exchange.handle(req)
            except GatewayError as err:  # SseError included
                yield self._fail(exchange, err)
                return
            except TimeoutError:
                yield self._fail(exchange, InspectionTimeout(
                    f"inspection took longer than {timeout * 1000:.0f} ms"))
                return
            except Exception:  # top-level handler: whatever broke, the answer is withheld
                logger.exception("ext_proc failed; withholding the answer (decision %s)",
                                 exchange.ctx.decision_id if exchange.ctx else None)
                yield self._fail(exchange, InspectionError("internal error in response inspection"))
                return
            yield resp

    @staticmethod
    def _fail(exchange: Exchange, err: GatewayError) -> pb.ProcessingResponse:
        ctx = exchange.ctx
        data = err.data if isinstance(err.data, dict) else {}
        if ctx is not None:
            err.data = {**data, "decision_id": ctx.decision_id}
        logger.warning("response withheld: %s (%s) method=%s server=%s decision=%s", err.code,
                       err.message, ctx.mcp_method if ctx else None, ctx.server if ctx else None,
                       ctx.decision_id if ctx else None)
        return out.immediate_error(err)
