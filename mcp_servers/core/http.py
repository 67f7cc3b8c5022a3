"""The HTTP edge of a Streamable HTTP endpoint, shared by this project's servers
(``mcp_servers.core.transport``) and the stdio bridge (``mcp_bridge.transport``): the checks a
request passes before its JSON-RPC message is read, each raising a ``BadTransportRequest`` (or
``PayloadTooLarge``) with the HTTP status the answer carries."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from gateway.assertion import Assertion
from gateway.caller import Caller
from gateway.errors import PayloadTooLarge
from mcp_servers.core.errors import BadTransportRequest
from mcp_servers.core.identity import ASSERTION_KEY

READ_CHUNK_BYTES = 65536
ALLOWED_METHODS = "GET, POST, DELETE"


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def media_types(header: str) -> set[str]:
    """The media types an Accept (or Content-Type) header names, parameters dropped."""
    return {part.split(";", 1)[0].strip().lower() for part in header.split(",") if part.strip()}


def hostname(host: str) -> str:
    """The host of a Host header, port dropped (IPv6 keeps its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_host_and_origin(request: web.Request, allowed_hosts: Collection[str],
                          allowed_origins: Collection[str] = ()) -> None:
    """DNS-rebinding protection: a Host outside ``allowed_hosts`` is 421, an Origin that is neither
    listed nor on an allowed host is 403 (``*`` allows any)."""
    if "*" not in allowed_hosts:
        host = hostname(request.headers.get("Host", ""))
        if host not in allowed_hosts:
            raise BadTransportRequest(f"Host {host!r} is not allowed", code="host_not_allowed",
                                      http_status=421)
    origin = request.headers.get("Origin")
    if origin is None:
        return
    normalized = origin.strip().lower().rstrip("/")
    if normalized in allowed_origins or "*" in allowed_origins:
        return
    parts = urlsplit(normalized)
    if parts.scheme in ("http", "https") and parts.hostname is not None:
        name = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if name in allowed_hosts:
            return
    raise BadTransportRequest(f"Origin {origin!r} is not allowed", code="origin_not_allowed",
                              http_status=403)


def request_caller(request: web.Request) -> Caller | None:
    """The caller the gateway's verified assertion names (mcp_servers.core.identity), else the one
    its identity headers name (gateway.caller), or None without them; a spelling the gateway
    never sends is refused (400), so one identity has exactly one form."""
    assertion: Assertion | None = request.get(ASSERTION_KEY)
    if assertion is not None:
        return assertion.caller
    try:
        return Caller.from_headers(request.headers.get)
    except ValueError:
        raise BadTransportRequest("an identity header is not in the gateway's encoding",
                                  code="invalid_identity_header") from None


def post_media(request: web.Request) -> tuple[bool, bool]:
    """(JSON answer accepted, SSE answer accepted) of a POST whose body is JSON; 415 / 406
    otherwise."""
    ctype = request.headers.get("Content-Type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise BadTransportRequest("Content-Type must be application/json", http_status=415)
    accept = media_types(request.headers.get("Accept", "application/json"))
    json_ok = bool(accept & {"application/json", "application/*", "*/*"})
    sse_ok = bool(accept & {"text/event-stream", "text/*", "*/*"})
    if not (json_ok or sse_ok):
        raise BadTransportRequest("Accept must include application/json and text/event-stream",
                                  http_status=406)
    return json_ok, sse_ok


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (PayloadTooLarge) as soon as it passes ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds the limit of {limit}",
                              data={"limit": limit})
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes", data={"limit": limit})
        chunks.append(chunk)
    return b"".join(chunks)


def method_not_allowed(method: str) -> BadTransportRequest:
    return BadTransportRequest(f"method {method} is not allowed; use POST, GET or DELETE",
                               http_status=405)
