"""Per-user and per-tool token buckets, in memory or shared through Redis.

A request takes one token from every bucket that applies to it (its user's and, for
``tools/call``, the tool's), all or nothing: a request refused by one bucket does not drain the
others. Per-tool buckets are shared by all users of a tool: they protect the server behind it.

Redis: one Lua script per request reads, refills and takes from all buckets atomically, using the
Redis clock so that every gateway instance agrees; each key expires once a full refill would have
happened (an idle bucket is a full bucket). Redis unreachable: the request is refused with 503
(fail closed: an outage must not remove the limits), each call bounded by a short timeout, and
for ``REDIS_BACKOFF_SECONDS`` after a failure requests are refused without trying, so an outage
costs neither latency nor a connection storm.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ext_authz.errors import RateLimited, RateLimitUnavailable
from gateway.config import RateLimitConfig, RateSpec

logger = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "mcpgw:rl:"
REDIS_BACKOFF_SECONDS = 1.0
MEMORY_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Limit:
    key: str
    spec: RateSpec
    scope: str  # "user" | "tool": named in the 429 answer and the decision log


def limits_for(cfg: RateLimitConfig, *, issuer: str, sub: str, server: str,
               tool: str | None) -> list[Limit]:
    out = []
    if cfg.per_user is not None:
        out.append(Limit(f"u:{issuer}|{sub}", cfg.per_user, "user"))
    if cfg.per_tool is not None and tool is not None:
        out.append(Limit(f"t:{server}/{tool}", cfg.per_tool, "tool"))
    return out


class RateLimiter(Protocol):
    async def acquire(self, limits: Sequence[Limit]) -> None:
        """Take a token from each bucket or raise RateLimited / RateLimitUnavailable."""

    async def close(self) -> None: ...


def _refused(limit: Limit, wait: float) -> RateLimited:
    return RateLimited(f"rate limit exceeded ({limit.scope}); retry later",
                       retry_after=max(1, math.ceil(wait)), scope=limit.scope)


class MemoryRateLimiter:
    """Buckets in this process only (one instance, or limits per instance)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = MEMORY_MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # key -> [tokens, last refill time, rate, burst]
        self._buckets: dict[str, list[float]] = {}

    async def acquire(self, limits: Sequence[Limit]) -> None:
        now = self._clock()
        levels = []
        for limit in limits:
            rate, burst = limit.spec.rate_per_second, float(limit.spec.burst)
            b = self._buckets.get(limit.key)
            tokens = burst if b is None else min(burst, b[0] + (now - b[1]) * rate)
            if tokens < 1.0:
                raise _refused(limit, (1.0 - tokens) / rate)
            levels.append(tokens)
        if len(self._buckets) >= self._max_keys:
            self._purge(now)
        for limit, tokens in zip(limits, levels, strict=True):
            self._buckets[limit.key] = [tokens - 1.0, now, limit.spec.rate_per_second,
                                        float(limit.spec.burst)]

    def _purge(self, now: float) -> None:
        full = [k for k, (t, ts, rate, burst) in self._buckets.items() if t + (now - ts) * rate >= burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:
            del self._buckets[next(iter(self._buckets))]

    async def close(self) -> None:
        self._buckets.clear()


# KEYS: the buckets; ARGV: rate and burst of each, in the same order.
# Returns {0, "0"} when taken, else {index of the refusing bucket, seconds to wait}.
# Floats travel as strings: Lua numbers returned to Redis are truncated to integers.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local worst, wait = 0, 0
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tk = tonumber(v[1])
  if tk == nil then
    tk = burst
  else
    tk = math.min(burst, tk + math.max(0, now - tonumber(v[2])) * rate)
  end
  if tk < 1 and (1 - tk) / rate > wait then
    worst, wait = i, (1 - tk) / rate
  end
  levels[i] = tk
end
if worst > 0 then
  return {worst, tostring(wait)}
end
for i = 1, #KEYS do
  local rate, burst = tonumber(ARGV[2*i-1]), tonumber(ARGV[2*i])
  redis.call('HSET', KEYS[i], 't', tostring(levels[i] - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
end
return {0, '0'}
"""


class RedisRateLimiter:
    """Buckets shared by every ext_authz instance through one Redis."""

    def __init__(self, url: str, *, timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # One retry covers a pooled connection that went stale when Redis restarted; the
        # timeouts bound the worst case well below Envoy's ext_authz timeout.
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1), health_check_interval=0)
        self._script: Any = self._redis.register_script(_LUA)
        self._clock = clock
        self._down_until = 0.0

    async def acquire(self, limits: Sequence[Limit]) -> None:
        if not limits:
            return
        if self._clock() < self._down_until:
            raise RateLimitUnavailable("the rate-limit store is unavailable")
        args: list[float | int] = []
        for limit in limits:
            args.extend((limit.spec.rate_per_second, limit.spec.burst))
        try:
            worst, wait = await self._script(keys=[REDIS_KEY_PREFIX + lim.key for lim in limits],
                                             args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + REDIS_BACKOFF_SECONDS
            logger.warning("rate-limit store unavailable, refusing requests for %.1fs: %s",
                           REDIS_BACKOFF_SECONDS, exc)
            raise RateLimitUnavailable("the rate-limit store is unavailable") from None
        if int(worst):
            raise _refused(limits[int(worst) - 1], float(wait))

    async def close(self) -> None:
        await self._redis.aclose()


def build_rate_limiter(cfg: RateLimitConfig, *, redis_timeout: float) -> RateLimiter:
    if cfg.backend == "redis":
        assert cfg.redis_url is not None  # guaranteed by config validation
        return RedisRateLimiter(cfg.redis_url, timeout=redis_timeout)
    return MemoryRateLimiter()
