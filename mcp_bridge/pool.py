"""Stateless 2026-07-28 clients on a pool of warm children.

The first message to a pool child is ``server/discover``. A child that answers speaks 2026-07-28
itself (*modern*): requests pass through with remapped ids; SDK servers lock a stdio connection to
the era of its first message, so a pool child never mixes eras. A child that refuses it
(-32601/-32600/...) is *translated*: the bridge initializes it with empty client capabilities,
answers ``server/discover`` from the stored initialize result, strips the envelope keys from
``params._meta`` and adds ``resultType: "complete"`` to results. Server-to-client requests cannot
reach a stateless client through a translated child: the child gets -32601 for them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.errors import METHOD_NOT_FOUND
from gateway.jsonrpc import error_response, result_response
from gateway.mcp import LATEST_HANDSHAKE_VERSION, META_PROTOCOL_VERSION, MODERN_VERSION, PROTOCOL_VERSIONS
from mcp_bridge.errors import UpstreamProtocolError, UpstreamUnavailable
from mcp_bridge.router import Exchange, ExitLog, Link
from mcp_bridge.settings import BridgeSettings

logger = logging.getLogger(__name__)

MODERN = "modern"
TRANSLATED = "translated"
ENVELOPE_PREFIX = "io.modelcontextprotocol/"
META_CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
CACHEABLE_METHODS = frozenset({"server/discover", "tools/list", "prompts/list", "resources/list",
                               "resources/templates/list", "resources/read"})
BRIDGE_INFO = {"name": "mcp-bridge", "version": "1"}


def strip_envelope(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the 2026-07-28 envelope keys a handshake-era server does not know."""
    meta = params.get("_meta")
    if not isinstance(meta, dict):
        return params
    kept = {k: v for k, v in meta.items() if not k.startswith(ENVELOPE_PREFIX)}
    out = {k: v for k, v in params.items() if k != "_meta"}
    if kept:
        out["_meta"] = kept
    return out


def complete(method: str) -> Any:
    """Make a handshake-era result a 2026-07-28 one."""
    def translate(response: dict[str, Any]) -> dict[str, Any]:
        result = response.get("result")
        if not isinstance(result, dict):
            return response
        result = {**result}
        result.setdefault("resultType", "complete")
        if method in CACHEABLE_METHODS:
            result.setdefault("ttlMs", 0)
            result.setdefault("cacheScope", "private")
        return {**response, "result": result}
    return translate


def discover_from_initialize(init: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"supportedVersions": list(PROTOCOL_VERSIONS),
                              "capabilities": init.get("capabilities", {}),
                              "serverInfo": init.get("serverInfo", BRIDGE_INFO)}
    if isinstance(init.get("instructions"), str):
        result["instructions"] = init["instructions"]
    return result


class Pool:
    """``pool_size`` warm children for stateless clients; least-in-flight pick."""

    def __init__(self, settings: BridgeSettings, exits: ExitLog) -> None:
        self.settings = settings
        self.exits = exits
        self.mode: str | None = None
        self.init_result: dict[str, Any] | None = None
        self.links = [Link(settings, f"p{i}", self, exits, handshake=self._handshake)
                      for i in range(settings.pool_size)]
        self._starters: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return any(link.ready.is_set() and not link.closed for link in self.links)

    def start(self) -> None:
        """Warm every child in the background; a failure restarts it with backoff."""
        self._starters = [asyncio.create_task(link.start_or_retry()) for link in self.links]

    async def _handshake(self, link: Link) -> None:
        if self.mode in (None, MODERN):
            envelope = {"_meta": {META_PROTOCOL_VERSION: MODERN_VERSION, META_CLIENT_CAPABILITIES: {}}}
            try:
                await link.call("server/discover", envelope)
            except UpstreamProtocolError:
                if self.mode == MODERN:
                    raise
                self.mode = TRANSLATED
            else:
                self.mode = MODERN
                logger.info("pool child speaks 2026-07-28", extra={"child": link.label})
                return
        result = await link.call("initialize", {"protocolVersion": LATEST_HANDSHAKE_VERSION,
                                                "capabilities": {}, "clientInfo": BRIDGE_INFO})
        self.init_result = result
        link.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})
        logger.info("pool child translated from the handshake era",
                    extra={"child": link.label, "protocol_version": result.get("protocolVersion")})

    async def pick(self) -> Link:
        if not self.links:
            raise UpstreamUnavailable("this bridge serves no stateless clients (pool size 0); "
                                      "use initialize and a session")
        ready = [link for link in self.links if link.ready.is_set() and not link.closed]
        if not ready:
            link = min(self.links, key=lambda candidate: candidate.in_flight)
            await link.wait_ready()
            return link
        return min(ready, key=lambda candidate: candidate.in_flight)

    async def forward(self, message: dict[str, Any], exchange: Exchange) -> Link | None:
        """Send a stateless request to a pool child; answered locally when the bridge can."""
        link = await self.pick()
        method = exchange.method
        if self.mode == TRANSLATED:
            if method == "server/discover":
                result = discover_from_initialize(self.init_result or {})
                await exchange.finish(complete(method)(result_response(exchange.client_id, result)))
                return None
            params = message.get("params")
            if isinstance(params, dict):
                message = {**message, "params": strip_envelope(params)}
            exchange.translate = complete(method)
        await link.request(message, exchange)
        return link

    # ---- Owner -----------------------------------------------------------------------------------

    async def child_notification(self, link: Link, message: dict[str, Any]) -> None:
        logger.debug("dropped a notification from a pool child", extra={"method": message.get("method")})

    async def child_request(self, link: Link, message: dict[str, Any]) -> None:
        # A stateless exchange has no back-channel to a client for a child's own request.
        try:
            link.notify(error_response(message["id"], {
                "code": METHOD_NOT_FOUND,
                "message": f"{message.get('method')} cannot reach a stateless client through the bridge"}))
        except UpstreamUnavailable:
            return

    async def child_restarted(self, link: Link) -> None:
        return

    async def link_failed(self, link: Link) -> None:
        return  # pool children keep being restarted with backoff; /ready reflects it

    async def close(self) -> None:
        for task in self._starters:
            task.cancel()
        await asyncio.gather(*(link.close() for link in self.links))
