"""Aggregate sessions: the sealed id (``gateway.aggregate.session_token``) and the little state
that cannot live in it.

The id holds the owner, the view, the protocol version, the client's capabilities and each
upstream's session id, so any replica serves it without shared state. Two facts arrive after the
id was issued and live in a store shared with ext_authz (Redis when configured, else this
process), under ``session_token.late_join_key(id, server)`` (a hash of the id, never the id) with
the session's TTL, the value being plain text:

- a late joiner: a server that was down at ``initialize`` and was initialized later; its upstream
  session id is looked up there only when the sealed id lacks the server;
- the end of the session (``DELETE``): the key of server ``*`` (no server is named so).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.aggregate.session_token import AggregateSession, InvalidSessionId, SessionSealer, late_join_key
from gateway.caller import SessionOwner
from mcp_aggregator.errors import AggregatorError, SessionGone

logger = logging.getLogger(__name__)

ENDED_SERVER = "*"
ENDED = "ended"
MAX_MEMORY_ENTRIES = 100_000
NOT_FOUND_MESSAGE = "session not found or ended; send a new initialize request"


def store_key(sid: str, server: str) -> str:
    """The store key of one fact about session ``sid``: a hash of the id, never the id."""
    return late_join_key(sid, server)


class StoreUnavailable(AggregatorError):
    code = "session_store_unavailable"
    http_status = 503


class SessionFacts(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str, ttl: float) -> None: ...

    async def close(self) -> None: ...


class MemoryFacts:
    """This process's facts: bounded (oldest first out) and expiring."""

    def __init__(self, *, max_entries: int = MAX_MEMORY_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._max = max_entries
        self._clock = clock

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] < self._clock():
            del self._entries[key]
            return None
        return entry[0]

    async def put(self, key: str, value: str, ttl: float) -> None:
        self._entries[key] = (value, self._clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisFacts:
    """Facts shared by every replica of ext_authz and the aggregator; Redis down fails closed."""

    def __init__(self, url: str) -> None:
        self._redis: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    async def get(self, key: str) -> str | None:
        try:
            value = await self._redis.get(key)
        except RedisError as exc:
            raise StoreUnavailable(f"session store unreachable: {type(exc).__name__}") from None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def put(self, key: str, value: str, ttl: float) -> None:
        try:
            await self._redis.set(key, value, px=max(1, int(ttl * 1000)))
        except RedisError as exc:
            raise StoreUnavailable(f"session store unreachable: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._redis.aclose()


class Sessions:
    """Seal, open and end aggregate sessions; find each server's upstream session id."""

    def __init__(self, sealer: SessionSealer, facts: SessionFacts, ttl: float) -> None:
        self.sealer = sealer
        self.facts = facts
        self.ttl = ttl

    def seal(self, session: AggregateSession) -> str:
        return self.sealer.seal(session)

    async def open(self, sid: str, owner: SessionOwner, view: str) -> AggregateSession:
        """The session of ``sid``; SessionGone for an altered id, another owner, another view's
        session or an ended one (all answered alike, so ids cannot be probed)."""
        try:
            session = self.sealer.open(sid)
        except InvalidSessionId:
            raise SessionGone(NOT_FOUND_MESSAGE) from None
        if (session.issuer, session.subject, session.tenant) != (owner.iss, owner.sub, owner.tenant) \
                or session.view != view:
            raise SessionGone(NOT_FOUND_MESSAGE)
        if await self.facts.get(store_key(sid, ENDED_SERVER)) == ENDED:
            raise SessionGone(NOT_FOUND_MESSAGE)
        return session

    async def upstream_ids(self, sid: str, session: AggregateSession,
                           servers: Iterable[str]) -> dict[str, str | None]:
        """Each server's upstream session id: sealed, else a late joiner's, else None."""
        out: dict[str, str | None] = {}
        for server in servers:
            if server in session.upstream:
                out[server] = session.upstream[server]
            else:
                out[server] = await self.facts.get(store_key(sid, server))
        return out

    async def joined(self, sid: str, server: str, upstream_id: str) -> None:
        """Record a late joiner's upstream session id."""
        await self.facts.put(store_key(sid, server), upstream_id, self.ttl)
        logger.info("server %s joined a session late", server, extra={"server": server})

    async def end(self, sid: str) -> None:
        await self.facts.put(store_key(sid, ENDED_SERVER), ENDED, self.ttl)


def upstream_map(ids: Mapping[str, str | None]) -> dict[str, str]:
    """The servers that have an upstream session."""
    return {server: sid for server, sid in ids.items() if sid is not None}
