"""A minimal MCP client (aiohttp) that fetches a server's tools, resources and prompts.

It speaks Streamable HTTP: ``initialize`` + ``notifications/initialized`` + paginated ``*/list``
for the session-based protocol versions, or plain ``*/list`` requests with ``MCP-Protocol-Version``,
``Mcp-Method`` and ``_meta`` for 2026-07-28 (stateless). Answers may be JSON or SSE. The caller
passes the gateway's own identity headers; a client's token is never used here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.catalog.store import CatalogError
from gateway.errors import METHOD_NOT_FOUND, GatewayError
from gateway.mcp import (
    LATEST_HANDSHAKE_VERSION,
    META_PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    STATEFUL_VERSIONS,
)
from gateway.upstream import UpstreamTarget, read_response
from gateway.wire import CLIENT_ID_HEADER, ROLES_HEADER, USER_HEADER

logger = logging.getLogger(__name__)

CLIENT_INFO = {"name": "mcp-gateway-catalog", "version": "0.1.0"}
# The identity the gateway itself presents to MCP servers when it lists their tools (servers trust
# these headers only from the gateway; Envoy overwrites them on client traffic).
CATALOG_IDENTITY = {USER_HEADER: "system:mcp-gateway-catalog", ROLES_HEADER: "gateway-catalog",
                    CLIENT_ID_HEADER: "mcp-gateway"}
MAX_PAGES = 1000  # a server that keeps returning a cursor is a bug or an attack; stop
MAX_BODY = 16 * 1024 * 1024
_LISTS = (("tools/list", "tools", "tools"), ("resources/list", "resources", "resources"),
          ("prompts/list", "prompts", "prompts"))


class FetchError(CatalogError):
    code = "catalog_fetch_error"
    http_status = 502


@dataclass(slots=True)
class Listing:
    protocol_version: str
    server_info: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)


class _Rpc:
    def __init__(self, http: aiohttp.ClientSession, target: UpstreamTarget,
                 headers: Mapping[str, str], version: str,
                 per_request: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.http = http
        self.per_request = per_request
        self.url = target.url
        self.kwargs = target.request_kwargs()
        self.base_headers = {**target.headers, **headers,
                             "Accept": "application/json, text/event-stream",
                             "Content-Type": "application/json"}
        self.version = version
        self.session_id: str | None = None
        self.negotiated = False
        self._ids = itertools.count(1)

    def headers_for(self, method: str) -> dict[str, str]:
        h = dict(self.base_headers)
        if self.per_request is not None:
            h.update(self.per_request())  # a caller assertion: one per request (its jti)
        if self.negotiated:
            h["MCP-Protocol-Version"] = self.version
        if self.session_id is not None:
            h["Mcp-Session-Id"] = self.session_id
        if self.version not in STATEFUL_VERSIONS:
            h["Mcp-Method"] = method
        return h

    async def notify(self, method: str) -> None:
        body = {"jsonrpc": "2.0", "method": method}
        async with self.http.post(self.url, json=body, headers=self.headers_for(method),
                                  **self.kwargs) as resp:
            if resp.status >= 400:
                raise FetchError(f"{method} was refused with HTTP {resp.status}")

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        if self.version not in STATEFUL_VERSIONS:
            params = {**params, "_meta": {META_PROTOCOL_VERSION: self.version}}
        body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        async with self.http.post(self.url, json=body, headers=self.headers_for(method),
                                  **self.kwargs) as resp:
            if method == "initialize" and "Mcp-Session-Id" in resp.headers:
                self.session_id = resp.headers["Mcp-Session-Id"]
            ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if resp.status >= 400 and ctype != "application/json":
                raise FetchError(f"{method} failed with HTTP {resp.status}")
            if ctype not in ("text/event-stream", "application/json"):
                raise FetchError(f"{method}: unexpected Content-Type {ctype!r} (HTTP {resp.status})")
            message = await read_response(resp, rid)
            if message is None and ctype == "text/event-stream":
                raise FetchError("the SSE stream ended without a response")
        if not isinstance(message, dict) or message.get("id") != rid:
            raise FetchError(f"{method}: the answer is not the JSON-RPC response to this request")
        if "error" in message:
            err = message["error"] if isinstance(message["error"], dict) else {}
            raise FetchError(f"{method} failed: {err.get('message', 'error')}",
                             data={"rpc_code": err.get("code")})
        result = message.get("result")
        if not isinstance(result, dict):
            raise FetchError(f"{method}: result is not an object")
        return result


async def _list_all(rpc: _Rpc, method: str, key: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        result = await rpc.call(method, {"cursor": cursor} if cursor is not None else {})
        page = result.get(key, [])
        if not isinstance(page, list) or not all(isinstance(i, dict) for i in page):
            raise FetchError(f"{method}: {key!r} is not a list of objects")
        items.extend(page)
        nxt = result.get("nextCursor")
        if nxt is None:
            return items
        if not isinstance(nxt, str) or nxt == cursor:
            raise FetchError(f"{method}: invalid nextCursor")
        cursor = nxt
    raise FetchError(f"{method}: more than {MAX_PAGES} pages")


async def fetch_listing(http: aiohttp.ClientSession, target: UpstreamTarget | str, *,
                        headers: Mapping[str, str],
                        protocol_version: str = LATEST_HANDSHAKE_VERSION,
                        per_request: Callable[[], Mapping[str, str]] | None = None) -> Listing:
    """Everything one server lists, following every ``nextCursor``. ``target``: the endpoint
    (``gateway.upstream``), or a plain URL. ``per_request`` adds headers made afresh for each
    request (the gateway's caller assertion, which a server accepts once)."""
    if protocol_version not in PROTOCOL_VERSIONS:
        raise FetchError(f"unsupported protocol version {protocol_version!r}")
    if isinstance(target, str):
        target = UpstreamTarget("", target)
    url = target.url
    rpc = _Rpc(http, target, headers, protocol_version, per_request)
    capabilities: dict[str, Any] | None = None
    listing = Listing(protocol_version)
    try:
        if protocol_version in STATEFUL_VERSIONS:
            init = await rpc.call("initialize", {"protocolVersion": protocol_version, "capabilities": {},
                                                 "clientInfo": CLIENT_INFO})
            version = init.get("protocolVersion")
            if version not in PROTOCOL_VERSIONS:
                raise FetchError(f"the server chose unsupported protocol version {version!r}")
            rpc.version = listing.protocol_version = str(version)
            rpc.negotiated = True
            caps = init.get("capabilities")
            capabilities = caps if isinstance(caps, dict) else {}
            info = init.get("serverInfo")
            listing.server_info = info if isinstance(info, dict) else {}
            await rpc.notify("notifications/initialized")
        else:
            rpc.negotiated = True
        for method, key, attr in _LISTS:
            if capabilities is not None and key not in capabilities:
                continue
            try:
                setattr(listing, attr, await _list_all(rpc, method, key))
            except FetchError as exc:
                # Without initialize (stateless) the capabilities are unknown: a missing method
                # means "nothing of this kind", not a failure.
                if capabilities is None and isinstance(exc.data, dict) \
                        and exc.data.get("rpc_code") == METHOD_NOT_FOUND:
                    continue
                raise
    except aiohttp.ClientError as exc:
        raise FetchError(f"cannot reach {url}: {exc}") from None
    except GatewayError as exc:
        if isinstance(exc, FetchError):
            raise
        raise FetchError(f"bad answer from {url}: {exc.message}") from None
    finally:
        if rpc.session_id is not None:
            try:
                async with http.delete(url, headers=rpc.headers_for(""), **rpc.kwargs):
                    pass
            except aiohttp.ClientError:
                logger.debug("ending the catalog session at %s failed", url)
    return listing
