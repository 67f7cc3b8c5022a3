"""Legs: HTTP requests from the aggregator to Envoy's per-server routes ``<base>/mcp/<server>``.

Each leg carries the client's ``Authorization`` (Envoy's per-server route checks it and strips it
before the upstream), the trace context and, on a virtual server, the view it acts for. Answers
may be JSON or SSE; whatever a leg cannot use becomes :class:`UpstreamFailed` with a stable
reason, a refusal by the route (401/403) becomes :class:`UpstreamDenied`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from gateway.errors import GatewayError
from gateway.jsonrpc import validate_message
from gateway.mcp import MODERN_VERSION, NAME_PARAM
from gateway.sse import SseError, SseParser
from gateway.wire import VIEW_HEADER
from mcp_aggregator.errors import (
    BAD_ANSWER,
    HTTP_ERROR,
    SESSION_LOST,
    UNREACHABLE,
    UpstreamDenied,
    UpstreamFailed,
)

logger = logging.getLogger(__name__)

JSON_AND_SSE = "application/json, text/event-stream"
SESSION_HEADER = "Mcp-Session-Id"
# Headers of the client's request a leg carries as they came.
FORWARDED_HEADERS = ("Authorization", "traceparent", "tracestate")
# An upstream answer bigger than this is refused (the client's own limit is the same order).
MAX_ANSWER_BYTES = 16 * 1024 * 1024

OnMessage = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LegContext:
    """What every leg of one client request carries: the client's forwarded headers, the
    protocol version of the exchange and the virtual view (None on ``/mcp``)."""

    forwarded: Mapping[str, str]
    protocol_version: str
    view: str | None = None

    @classmethod
    def of(cls, headers: Mapping[str, str], protocol_version: str, view: str | None) -> LegContext:
        forwarded = {name: value for name in FORWARDED_HEADERS if (value := headers.get(name)) is not None}
        return cls(forwarded=forwarded, protocol_version=protocol_version, view=view)

    def headers(self, accept: str = JSON_AND_SSE, session_id: str | None = None) -> dict[str, str]:
        out = {**self.forwarded, "Accept": accept, "MCP-Protocol-Version": self.protocol_version}
        if self.view:
            out[VIEW_HEADER] = self.view
        if session_id:
            out[SESSION_HEADER] = session_id
        return out


@dataclass(frozen=True, slots=True)
class LegAnswer:
    """The upstream's JSON-RPC response and the session id its answer named (initialize)."""

    message: dict[str, Any]
    session_id: str | None

    @property
    def result(self) -> dict[str, Any] | None:
        value = self.message.get("result")
        return value if isinstance(value, dict) else None

    @property
    def error(self) -> dict[str, Any] | None:
        value = self.message.get("error")
        return value if isinstance(value, dict) else None


def _modern_headers(message: Mapping[str, Any]) -> dict[str, str]:
    """Mcp-Method / Mcp-Name: required on 2026-07-28 requests, and checked against the body."""
    method = message.get("method")
    out: dict[str, str] = {}
    if isinstance(method, str):
        out["Mcp-Method"] = method
        key = NAME_PARAM.get(method)
        params = message.get("params")
        if key is not None and isinstance(params, dict) and isinstance(params.get(key), str):
            out["Mcp-Name"] = params[key]
    return out


class Upstreams:
    """The HTTP client of every leg (one connection pool per process)."""

    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base.rstrip("/")
        self.http = http
        self._ids = itertools.count(1)

    def url(self, server: str) -> str:
        return f"{self.base}/mcp/{server}"

    def next_id(self) -> int:
        return next(self._ids)

    def _headers(self, message: Mapping[str, Any], ctx: LegContext, session_id: str | None,
                 accept: str = JSON_AND_SSE) -> dict[str, str]:
        headers = ctx.headers(accept, session_id)
        headers["Content-Type"] = "application/json"
        if ctx.protocol_version >= MODERN_VERSION:
            headers.update(_modern_headers(message))
        return headers

    async def request(self, server: str, message: dict[str, Any], ctx: LegContext, *,
                      session_id: str | None = None, on_message: OnMessage | None = None) -> LegAnswer:
        """Send one request and return its answer. Messages the upstream sends before the answer
        on an SSE response (progress, its own requests) go to ``on_message``, else are dropped."""
        rid = message["id"]
        headers = self._headers(message, ctx, session_id)
        try:
            async with self.http.post(self.url(server), data=orjson.dumps(message), headers=headers) as resp:
                self._check_status(server, resp.status, session_id)
                answer_sid = resp.headers.get(SESSION_HEADER)
                ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
                if ctype == "application/json":
                    body = await resp.content.read(MAX_ANSWER_BYTES + 1)
                    if len(body) > MAX_ANSWER_BYTES:
                        raise UpstreamFailed(server, BAD_ANSWER, "answer over the size limit")
                    return LegAnswer(self._response(server, body, rid, resp.status), answer_sid)
                if ctype == "text/event-stream":
                    return LegAnswer(await self._read_sse(server, resp, rid, on_message), answer_sid)
                raise UpstreamFailed(server, BAD_ANSWER if resp.status < 400 else HTTP_ERROR,
                                     f"HTTP {resp.status} {ctype or 'without a body type'}")
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(server, UNREACHABLE, type(exc).__name__) from None

    @staticmethod
    def _check_status(server: str, status: int, session_id: str | None) -> None:
        if status in (401, 403):
            raise UpstreamDenied(server, status)
        if status == 404 and session_id:
            raise UpstreamFailed(server, SESSION_LOST, "the upstream session is gone", status)
        if status >= 500 or status in (404, 405, 406, 415, 421):
            raise UpstreamFailed(server, HTTP_ERROR, f"HTTP {status}", status)

    @staticmethod
    def _response(server: str, body: bytes, rid: int, status: int) -> dict[str, Any]:
        try:
            message = validate_message(orjson.loads(body))
        except (orjson.JSONDecodeError, GatewayError):
            raise UpstreamFailed(server, BAD_ANSWER if status < 400 else HTTP_ERROR,
                                 f"HTTP {status}, not a JSON-RPC answer") from None
        if message.kind != "response" or message.raw.get("id") != rid:
            raise UpstreamFailed(server, BAD_ANSWER, "not the answer to the leg's request")
        return message.raw

    @staticmethod
    async def _read_sse(server: str, resp: aiohttp.ClientResponse, rid: int,
                        on_message: OnMessage | None) -> dict[str, Any]:
        parser = SseParser(max_buffer=MAX_ANSWER_BYTES)
        try:
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    if not event.data:
                        continue
                    try:
                        message = validate_message(orjson.loads(event.data))
                    except (orjson.JSONDecodeError, GatewayError):
                        raise UpstreamFailed(server, BAD_ANSWER, "an SSE event is not JSON-RPC") from None
                    if message.kind == "response" and message.raw.get("id") == rid:
                        return message.raw
                    if on_message is not None:
                        await on_message(message.raw)
        except SseError as exc:
            raise UpstreamFailed(server, BAD_ANSWER, exc.message) from None
        raise UpstreamFailed(server, BAD_ANSWER, "the SSE answer ended without a response")

    async def send(self, server: str, message: dict[str, Any], ctx: LegContext, *,
                   session_id: str | None) -> int:
        """POST a notification or a response (answered 202); the HTTP status."""
        headers = self._headers(message, ctx, session_id)
        try:
            async with self.http.post(self.url(server), data=orjson.dumps(message), headers=headers) as resp:
                await resp.read()
                self._check_status(server, resp.status, session_id)
                return resp.status
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(server, UNREACHABLE, type(exc).__name__) from None

    async def delete(self, server: str, ctx: LegContext, session_id: str) -> int:
        try:
            async with self.http.delete(self.url(server), headers=ctx.headers(session_id=session_id)) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(server, UNREACHABLE, type(exc).__name__) from None

    @asynccontextmanager
    async def stream(self, server: str, ctx: LegContext, session_id: str,
                     last_event_id: str | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The upstream session's GET stream (``Last-Event-ID`` resumes it); raises like a request."""
        headers = ctx.headers("text/event-stream", session_id)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        try:
            async with self.http.get(self.url(server), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as resp:
                self._check_status(server, resp.status, session_id)
                ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
                if resp.status != 200 or ctype != "text/event-stream":
                    raise UpstreamFailed(server, HTTP_ERROR, f"GET answered HTTP {resp.status} {ctype}")
                yield resp
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(server, UNREACHABLE, type(exc).__name__) from None
