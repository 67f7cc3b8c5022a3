"""Handshake-era sessions (2025-06-18, 2025-11-25): one child per MCP session.

Stdio servers keep per-connection state (negotiated capabilities, roots, log level,
subscriptions) and send their own requests (sampling, elicitation, roots/list) that must reach
exactly one client, so a session owns its child. ``initialize`` spawns it; the stored
``initialize`` and ``notifications/initialized`` are replayed to a respawned child, so the session
id survives a crash. A session is bound to the caller that created it (as in
``mcp_servers.core.session``): anyone else gets 404.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import logging
import time
from typing import Any

from gateway.caller import SessionOwner
from mcp_bridge.errors import SessionGone, SessionLimit, UpstreamProtocolError
from mcp_bridge.router import ClientId, Exchange, ExitLog, Link
from mcp_bridge.settings import BridgeSettings
from mcp_servers.core.streams import EventStream, find_stream, new_token

logger = logging.getLogger(__name__)

MAX_KEPT_STREAMS = 64


def same_owner(a: SessionOwner, b: SessionOwner) -> bool:
    def same(x: str | None, y: str | None) -> bool:
        if x is None or y is None:
            return x is y
        return hmac.compare_digest(x.encode(), y.encode())
    return all([same(a.iss, b.iss), same(a.sub, b.sub), same(a.tenant, b.tenant)])


class BridgeSession:
    """A client's MCP session and the child that serves it."""

    def __init__(self, settings: BridgeSettings, owner: SessionOwner, init_params: dict[str, Any],
                 exits: ExitLog, on_failed: Any) -> None:
        self.id = new_token()
        self.settings = settings
        self.owner = owner
        self.init_params = init_params
        self.init_result: dict[str, Any] | None = None
        self.initialized = False
        self.last_seen = time.monotonic()
        self.streams: collections.OrderedDict[str, EventStream] = collections.OrderedDict()
        self.standalone: EventStream | None = None
        self.active: list[Exchange] = []
        self.by_client: dict[ClientId, Exchange] = {}
        self.server_requests: dict[str, ClientId] = {}
        self._server_ids = itertools.count(1)
        self._on_failed = on_failed
        self.link = Link(settings, f"s-{self.id[:8]}", self, exits, handshake=self._handshake)

    @property
    def protocol_version(self) -> str | None:
        version = (self.init_result or {}).get("protocolVersion")
        return version if isinstance(version, str) else None

    async def _handshake(self, link: Link) -> None:
        result = await link.call("initialize", self.init_params)
        if self.init_result is None:
            self.init_result = result
        elif result.get("protocolVersion") != self.init_result.get("protocolVersion"):
            raise UpstreamProtocolError("the restarted stdio server negotiated another protocol version")
        if self.initialized:
            link.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})

    # ---- streams ---------------------------------------------------------------------------------

    def track(self, exchange: Exchange) -> None:
        self.streams[exchange.stream.id] = exchange.stream
        while len(self.streams) > MAX_KEPT_STREAMS:
            oldest = next(iter(self.streams))
            if not self.streams[oldest].finished:
                break
            del self.streams[oldest]
        self.active.append(exchange)
        if exchange.client_id is not None:
            self.by_client[exchange.client_id] = exchange
        exchange.future.add_done_callback(lambda _f: self._untrack(exchange))

    def _untrack(self, exchange: Exchange) -> None:
        if exchange in self.active:
            self.active.remove(exchange)
        if exchange.client_id is not None and self.by_client.get(exchange.client_id) is exchange:
            del self.by_client[exchange.client_id]

    def standalone_stream(self) -> EventStream:
        if self.standalone is None or self.standalone.finished:
            self.standalone = EventStream(max_buffered=self.settings.max_buffered_events, standalone=True)
            self.streams[self.standalone.id] = self.standalone
        return self.standalone

    def find_stream(self, event_id: str) -> tuple[EventStream, int] | None:
        return find_stream(self.streams, event_id)

    # ---- Owner: what the child sends besides answers ---------------------------------------------

    async def child_notification(self, link: Link, message: dict[str, Any]) -> None:
        await self.standalone_stream().publish(message)

    async def child_request(self, link: Link, message: dict[str, Any]) -> None:
        # stdio says nothing about which client request caused this one: the newest in flight is
        # the best guess, and it is the right client either way.
        sid = f"b{next(self._server_ids)}"
        self.server_requests[sid] = message["id"]
        outgoing = {**message, "id": sid}
        live = [e for e in self.active if not e.future.done() and not e.cancelled]
        if live:
            await live[-1].publish(outgoing)
        else:
            await self.standalone_stream().publish(outgoing)

    async def child_restarted(self, link: Link) -> None:
        self.server_requests.clear()
        capabilities = (self.init_result or {}).get("capabilities")
        if isinstance(capabilities, dict) and isinstance(capabilities.get("tools"), dict):
            await self.standalone_stream().publish(
                {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})

    async def link_failed(self, link: Link) -> None:
        logger.warning("session ended: its stdio server does not restart", extra={"session": self.id[:8]})
        await self._on_failed(self)

    def client_response(self, message: dict[str, Any]) -> bool:
        """Send the client's answer to a child request back with the child's id."""
        rid = message.get("id")
        child_id = self.server_requests.pop(rid, None) if isinstance(rid, str) else None
        if child_id is None:
            logger.info("ignored an answer to an unknown server request", extra={"rpc_id": rid})
            return False
        self.link.notify({**message, "id": child_id})
        return True

    async def close(self) -> None:
        await self.link.close()
        for stream in self.streams.values():
            await stream.finish()


class SessionTable:
    """Sessions by id, at most ``max_sessions`` (then 503), expired after ``session_idle_seconds``."""

    def __init__(self, settings: BridgeSettings, exits: ExitLog) -> None:
        self.settings = settings
        self.exits = exits
        self._sessions: dict[str, BridgeSession] = {}
        self._starting = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[BridgeSession]:
        return list(self._sessions.values())

    async def create(self, owner: SessionOwner, init_params: dict[str, Any]) -> BridgeSession:
        """Spawn a child for a new session and run its initialize; raises SessionLimit."""
        await self.expire()
        if len(self._sessions) + self._starting >= self.settings.max_sessions:
            raise SessionLimit(f"all {self.settings.max_sessions} sessions are in use; retry later",
                               data={"limit": self.settings.max_sessions})
        session = BridgeSession(self.settings, owner, init_params, self.exits, self.remove)
        self._starting += 1
        try:
            await session.link.start()
        except BaseException:
            await session.close()  # no restart in the background for a session nobody holds
            raise
        finally:
            self._starting -= 1
        self._sessions[session.id] = session
        logger.info("session created", extra={"session": session.id[:8], "pid": session.link.child.pid
                                               if session.link.child else None,
                                               "protocol_version": session.protocol_version})
        return session

    def get(self, session_id: str, owner: SessionOwner) -> BridgeSession:
        session = self._sessions.get(session_id)
        if session is None or not same_owner(session.owner, owner):
            raise SessionGone("session not found or ended; send a new initialize request")
        if time.monotonic() - session.last_seen > self.settings.session_idle_seconds and not session.active:
            raise SessionGone("session expired; send a new initialize request")
        session.last_seen = time.monotonic()
        return session

    async def remove(self, session: BridgeSession) -> None:
        if self._sessions.pop(session.id, None) is not None:
            logger.info("session ended", extra={"session": session.id[:8]})
        await session.close()

    async def expire(self) -> None:
        now = time.monotonic()
        idle = [s for s in self._sessions.values()
                if now - s.last_seen > self.settings.session_idle_seconds and not s.active]
        for session in idle:
            await self.remove(session)

    async def run_expiry(self) -> None:
        """Stop the children of idle sessions, forever (cancelled at shutdown)."""
        period = min(self.settings.session_idle_seconds / 4, 30.0)
        while True:
            await asyncio.sleep(period)  # periodic sweep, not a readiness wait
            await self.expire()

    async def close_all(self) -> None:
        await asyncio.gather(*(self.remove(s) for s in self.all()))
