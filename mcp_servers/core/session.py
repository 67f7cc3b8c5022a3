"""Sessions of stateful clients (2025-06-18 / 2025-11-25) and in-flight request bookkeeping.

A session is never authentication: it is bound to the caller the gateway authenticated when the
session was created (issuer, user and tenant: ``x-mcp-issuer``, ``x-mcp-user``, ``x-mcp-tenant``),
and a request for it from anyone else, or from the same user in another tenant, is answered as if
the session did not exist (404), so session ids cannot be probed across callers. The gateway
binds sessions too (``ext_authz.sessions``); this is the server's own check behind it.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.caller import SessionOwner
from mcp_servers.core.errors import SessionNotFound
from mcp_servers.core.streams import EventStream, find_stream, new_token

# Finished POST streams kept for a late resumption; older ones are dropped first.
MAX_KEPT_STREAMS = 64


@dataclass(slots=True)
class InFlight:
    """A request being handled: its task and the event a cancellation sets."""

    task: asyncio.Task[Any]
    cancelled: asyncio.Event
    cancel_timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Session:
    id: str
    owner: SessionOwner
    protocol_version: str
    client_capabilities: dict[str, Any]
    client_info: dict[str, Any]
    max_buffered_events: int
    last_seen: float = field(default_factory=time.monotonic)
    initialized: bool = False
    log_level: str | None = None
    subscriptions: set[str] = field(default_factory=set)
    streams: collections.OrderedDict[str, EventStream] = field(default_factory=collections.OrderedDict)
    standalone: EventStream | None = None
    inflight: dict[str | int, InFlight] = field(default_factory=dict)
    closed: bool = False

    def new_stream(self) -> EventStream:
        stream = EventStream(max_buffered=self.max_buffered_events)
        self.streams[stream.id] = stream
        while len(self.streams) > MAX_KEPT_STREAMS:
            oldest = next(iter(self.streams))
            if not self.streams[oldest].finished:
                break
            del self.streams[oldest]
        return stream

    def standalone_stream(self) -> EventStream:
        if self.standalone is None:
            self.standalone = EventStream(max_buffered=self.max_buffered_events, standalone=True)
            self.streams[self.standalone.id] = self.standalone
        return self.standalone

    def find_stream(self, event_id: str) -> tuple[EventStream, int] | None:
        return find_stream(self.streams, event_id)

    async def close(self) -> None:
        self.closed = True
        for flight in list(self.inflight.values()):
            flight.cancelled.set()
            flight.task.cancel()
        for stream in self.streams.values():
            await stream.finish()


def _same_value(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a.encode(), b.encode())


def _same_owner(a: SessionOwner, b: SessionOwner) -> bool:
    # Every part compared (no early exit): the answer takes as long whichever part differs.
    same = [_same_value(a.iss, b.iss), _same_value(a.sub, b.sub),
            _same_value(a.tenant, b.tenant)]
    return all(same)


class SessionStore:
    """In-memory sessions with an idle timeout and a size bound."""

    def __init__(self, *, idle_timeout: float, max_sessions: int, max_buffered_events: int) -> None:
        self._sessions: dict[str, Session] = {}
        self._idle_timeout = idle_timeout
        self._max_sessions = max_sessions
        self._max_buffered = max_buffered_events

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    async def create(self, *, owner: SessionOwner, protocol_version: str,
                     client_capabilities: dict[str, Any], client_info: dict[str, Any]) -> Session:
        await self.expire()
        if len(self._sessions) >= self._max_sessions:
            # Evict the least recently used session rather than refuse new clients.
            victim = min(self._sessions.values(), key=lambda s: s.last_seen)
            await self.remove(victim)
        session = Session(id=new_token(), owner=owner, protocol_version=protocol_version,
                          client_capabilities=client_capabilities, client_info=client_info,
                          max_buffered_events=self._max_buffered)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, owner: SessionOwner) -> Session:
        session = self._sessions.get(session_id)
        if session is None or session.closed or not _same_owner(session.owner, owner):
            raise SessionNotFound("session not found or ended; send a new initialize request")
        if time.monotonic() - session.last_seen > self._idle_timeout:
            raise SessionNotFound("session expired; send a new initialize request")
        session.last_seen = time.monotonic()
        return session

    async def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        await session.close()

    async def expire(self) -> None:
        now = time.monotonic()
        for session in [s for s in self._sessions.values()
                        if now - s.last_seen > self._idle_timeout and not s.inflight]:
            await self.remove(session)

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await self.remove(session)
