"""Session binding: an ``Mcp-Session-Id`` belongs to the caller that first used it.

MCP sessions are never authentication, and the gateway fronts servers it did not write, so the
binding lives here rather than in each server: the owner (issuer, subject, tenant) of a session
is recorded the first time the gateway sees a request carrying its id, which for a conforming
client is its ``notifications/initialized`` right after ``initialize`` (ext_authz never sees the
``initialize`` answer that carries a fresh id: that is the trust-on-first-use window). From then
on:

- another issuer or subject gets 404 ``session_not_found``, the same answer as for an ended
  session, so ids cannot be probed across users;
- the same principal in another tenant reaches the policy with ``input.session`` naming the owner
  (``session_crosses_tenant`` answers 403 ``session_tenant_mismatch``), and the gateway refuses
  it itself if the policy did not (:meth:`SessionBinder.check_tenant`);
- ``DELETE`` ends the session: its id answers 404 for everyone until the record expires.

An aggregate session (``/mcp``, ``/mcp/<virtual>``: a sealed id, ``gateway.aggregate``) is
bound and ended the same way under the server :data:`AGGREGATE_SERVER`; its owner is the one
sealed in it, so no first-use window exists there.

Ids are checked before any lookup (length, visible ASCII without ","), and stored only as a
keyed hash with the server name (the same id on two servers is two sessions; the store never
holds a usable id). Bindings live in memory (LRU, idle TTL, a cap per principal) or, when the
rate limiter uses Redis, in the same Redis, shared by every ext_authz process; Redis unreachable
answers 503 (fail closed), with the rate limiter's timeout and back-off.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.aggregate.session_token import late_join_key
from gateway.caller import SessionOwner
from gateway.errors import FORBIDDEN, INTERNAL_ERROR, INVALID_REQUEST, SESSION_NOT_FOUND, GatewayError

logger = logging.getLogger(__name__)

SESSION_HEADER = "mcp-session-id"
# The spec allows any visible ASCII; real ids are UUIDs, hex or base64 (Envoy's own MCP router
# packs the upstream ids of several servers into one base64 id, hence the room).
MAX_SESSION_ID_CHARS = 1024
# Envoy joins repeated headers with "," before ext_authz sees them, while an upstream may read
# only the first copy: an id with "," could be two ids, one checked and another used.
_FORBIDDEN_ID_CHARS = frozenset(",")
IDLE_TTL_SECONDS = 3600.0  # >= the session idle timeout of the servers behind the gateway
MAX_BINDINGS = 100_000
# One principal cannot push every other principal's bindings out of the LRU (after which their
# ids would be claimable again): past this, its own oldest binding goes first.
MAX_BINDINGS_PER_PRINCIPAL = 1_000
REDIS_KEY_PREFIX = "mcpgw:sess:"
# The server name under which aggregate session ids are bound and ended (never a server's name).
AGGREGATE_SERVER = "*"
REDIS_BACKOFF_SECONDS = 1.0
_ENDED_TEXT = "ended"
NOT_FOUND_MESSAGE = "session not found or ended; send a new initialize request"


class SessionNotFound(GatewayError):
    """Another principal's session, an ended one or an expired one: all answered alike."""

    code = "session_not_found"
    rpc_code = SESSION_NOT_FOUND
    http_status = 404


class InvalidSessionId(GatewayError):
    code = "invalid_session_id"
    rpc_code = INVALID_REQUEST
    http_status = 400


class SessionTenantMismatch(GatewayError):
    """The session's owner had another tenant (the policy's reason for the same refusal)."""

    code = "session_tenant_mismatch"
    rpc_code = FORBIDDEN
    http_status = 403


class SessionStoreUnavailable(GatewayError):
    code = "session_store_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class _Ended:
    """The record of a session its owner ended (DELETE)."""


ENDED: Final = _Ended()
Binding = SessionOwner | _Ended


def session_key(server: str, session_id: str) -> str:
    """The store key of one server's session: a hash, never the id itself."""
    digest = hashlib.blake2b(f"{server}\0{session_id}".encode(), digest_size=20,
                             person=b"mcpgw-session")
    return digest.hexdigest()


def session_id_of(headers: dict[str, str], *, max_chars: int = MAX_SESSION_ID_CHARS) -> str | None:
    """The request's session id, checked for size and alphabet before it is used for anything.
    ``max_chars``: larger on the aggregate endpoints, whose sealed ids grow with the servers."""
    value = headers.get(SESSION_HEADER)
    if value is None:
        return None
    if not value:
        raise InvalidSessionId("Mcp-Session-Id is empty", data={"limit": "session_id_chars"})
    if len(value) > max_chars:
        raise InvalidSessionId(f"Mcp-Session-Id is longer than {max_chars} characters",
                               data={"limit": "session_id_chars", "max": max_chars})
    if not visible_ascii(value) or any(ch in value for ch in _FORBIDDEN_ID_CHARS):
        raise InvalidSessionId(
            "Mcp-Session-Id must be one visible-ASCII value (repeated headers are refused)",
            data={"limit": "session_id_charset"})
    return value


def visible_ascii(value: str) -> bool:
    """Only characters 0x21-0x7E (checked in C: a sealed aggregate id is hundreds long)."""
    return value.isascii() and value.isprintable() and " " not in value


class SessionStore(Protocol):
    async def bind(self, key: str, caller: SessionOwner) -> Binding:
        """The session's binding, recording ``caller`` as owner when it has none (atomically);
        a known session's idle time starts again."""

    async def end(self, key: str) -> None:
        """Forget the owner; the id answers as ended until its record expires."""

    async def late_joined(self, key: str) -> str | None:
        """The upstream session id the aggregator stored under ``key``
        (``gateway.aggregate.session_token.late_join_key``), if any."""

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Entry:
    binding: Binding
    last_seen: float


class MemorySessionStore:
    """Bindings of this process only: LRU + idle TTL, bounded per principal and in total.

    With several ext_authz processes and no Redis, each process binds an id the first time it
    sees it, so the trust-on-first-use window is per process (see the module docstring)."""

    def __init__(self, *, ttl: float = IDLE_TTL_SECONDS, max_bindings: int = MAX_BINDINGS,
                 max_per_principal: int = MAX_BINDINGS_PER_PRINCIPAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        # Each principal's keys in claim order: its oldest is found without a scan.
        self._by_principal: dict[tuple[str | None, str | None], dict[str, None]] = {}
        self._ttl = ttl
        self._max = max_bindings
        self._max_per_principal = max_per_principal
        self._clock = clock
        # Late-joined upstream sessions are written by the aggregator, another process: only a
        # shared (Redis) store can hold them. This one serves tests and single-process setups.
        self.late_joins: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def bind(self, key: str, caller: SessionOwner) -> Binding:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.last_seen > self._ttl:
            self._drop(key)
            entry = None
        if entry is not None:
            entry.last_seen = now
            self._entries.move_to_end(key)
            return entry.binding
        principal = (caller.iss, caller.sub)
        owned = self._by_principal.get(principal)
        if owned is not None and len(owned) >= self._max_per_principal:
            self._drop(next(iter(owned)))
        self._expire(now)
        while len(self._entries) >= self._max:
            self._drop(next(iter(self._entries)))
        self._entries[key] = _Entry(caller, now)
        self._by_principal.setdefault(principal, {})[key] = None
        return caller

    async def end(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        self._uncount(key, entry.binding)
        entry.binding = ENDED
        entry.last_seen = self._clock()
        self._entries.move_to_end(key)

    async def late_joined(self, key: str) -> str | None:
        return self.late_joins.get(key)

    async def close(self) -> None:
        self._entries.clear()
        self._by_principal.clear()
        self.late_joins.clear()

    def _expire(self, now: float) -> None:
        # LRU order is last-use order: expired records are at the front.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_seen <= self._ttl:
                return
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._uncount(key, entry.binding)

    def _uncount(self, key: str, binding: Binding) -> None:
        if isinstance(binding, SessionOwner):
            principal = (binding.iss, binding.sub)
            owned = self._by_principal.get(principal)
            if owned is not None:
                owned.pop(key, None)
                if not owned:
                    del self._by_principal[principal]


# KEYS[1]: the binding; ARGV: the caller (encoded), the idle TTL in ms. Returns the binding.
_BIND_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""
# Only a known session is ended: an id nobody used stays unknown.
_END_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


class RedisSessionStore:
    """Bindings shared by every ext_authz process through Redis (the rate limiter's)."""

    def __init__(self, url: str, *, timeout: float, ttl: float = IDLE_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=0)
        self._bind: Any = self._redis.register_script(_BIND_LUA)
        self._end: Any = self._redis.register_script(_END_LUA)
        self._ttl_ms = max(1, int(ttl * 1000))
        self._clock = clock
        self._down_until = 0.0

    async def bind(self, key: str, caller: SessionOwner) -> Binding:
        raw = await self._call(self._bind, key, caller.encode())
        if raw in (_ENDED_TEXT, _ENDED_TEXT.encode()):
            return ENDED
        try:
            return SessionOwner.decode(raw)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            # Not a record this service wrote: nobody can own it.
            logger.warning("unreadable session binding in Redis; treating the session as ended")
            return ENDED

    async def end(self, key: str) -> None:
        await self._call(self._end, key, _ENDED_TEXT)

    async def late_joined(self, key: str) -> str | None:
        if self._clock() < self._down_until:
            raise SessionStoreUnavailable("the session store is unavailable")
        try:
            raw = await self._redis.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + REDIS_BACKOFF_SECONDS
            logger.warning("session store unavailable, refusing session requests for %.1fs: %s",
                           REDIS_BACKOFF_SECONDS, exc)
            raise SessionStoreUnavailable("the session store is unavailable") from None
        if isinstance(raw, bytes):
            try:
                return raw.decode("ascii")
            except UnicodeDecodeError:
                return None
        return raw if isinstance(raw, str) else None

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, script: Any, key: str, value: bytes | str) -> Any:
        if self._clock() < self._down_until:
            raise SessionStoreUnavailable("the session store is unavailable")
        try:
            return await script(keys=[REDIS_KEY_PREFIX + key], args=[value, self._ttl_ms])
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + REDIS_BACKOFF_SECONDS
            logger.warning("session store unavailable, refusing session requests for %.1fs: %s",
                           REDIS_BACKOFF_SECONDS, exc)
            raise SessionStoreUnavailable("the session store is unavailable") from None


class SessionBinder:
    """What the servicer asks about sessions; the store decides where bindings live."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def owner(self, server: str, session_id: str, caller: SessionOwner) -> SessionOwner:
        """The session's owner (``caller`` for a session first seen now); SessionNotFound for
        another issuer or subject, or an ended session."""
        binding = await self.store.bind(session_key(server, session_id), caller)
        if isinstance(binding, _Ended) or not binding.same_principal(caller):
            raise SessionNotFound(NOT_FOUND_MESSAGE)
        return binding

    @staticmethod
    def check_tenant(owner: SessionOwner, caller: SessionOwner) -> None:
        """The gateway's own tenant check, whatever the policy decided."""
        if owner.tenant != caller.tenant:
            raise SessionTenantMismatch("this session belongs to another tenant")

    async def end(self, server: str, session_id: str) -> None:
        await self.store.end(session_key(server, session_id))

    async def late_joined(self, aggregate_id: str, server: str) -> str | None:
        """The upstream session id of ``server`` that joined the aggregate session
        ``aggregate_id`` after its initialize (written by the aggregator), or None."""
        return await self.store.late_joined(late_join_key(aggregate_id, server))

    async def close(self) -> None:
        await self.store.close()


def build_session_binder(backend: str, redis_url: str | None, *, timeout: float,
                         ttl: float = IDLE_TTL_SECONDS, max_bindings: int = MAX_BINDINGS,
                         processes: int = 1) -> SessionBinder:
    """Redis when the rate limiter uses it (shared), else this process's memory."""
    if backend == "redis" and redis_url is not None:
        return SessionBinder(RedisSessionStore(redis_url, timeout=timeout, ttl=ttl))
    if processes > 1:
        logger.warning("session bindings are per ext_authz process (%d processes, no Redis): each "
                       "process binds a session id the first time it sees it; configure "
                       "rate_limits.backend: redis to share them", processes)
    return SessionBinder(MemorySessionStore(ttl=ttl, max_bindings=max_bindings))
