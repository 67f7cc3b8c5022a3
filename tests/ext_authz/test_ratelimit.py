"""Token buckets in memory and in a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from ext_authz.errors import RateLimited, RateLimitUnavailable
from ext_authz.ratelimit import (
    REDIS_KEY_PREFIX,
    Limit,
    MemoryRateLimiter,
    RedisRateLimiter,
    limits_for,
)
from gateway.config import RateLimitConfig, RateSpec
from tests.ports import free_port

USER = Limit("u:iss|alice", RateSpec(1.0, 2), "user")
TOOL = Limit("t:files/read_file", RateSpec(1.0, 3), "tool")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_limiter(redis_url: str) -> AsyncIterator[RedisRateLimiter]:
    admin = Redis.from_url(redis_url)
    await admin.flushdb()
    await admin.aclose()
    limiter = RedisRateLimiter(redis_url, timeout=0.5)
    try:
        yield limiter
    finally:
        await limiter.close()


async def test_memory_bucket_burst_then_refill() -> None:
    """The burst is available at once; then one token per 1/rate seconds."""
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    await limiter.acquire([USER])
    await limiter.acquire([USER])
    with pytest.raises(RateLimited) as info:
        await limiter.acquire([USER])
    assert info.value.retry_after == 1 and info.value.scope == "user" and info.value.http_status == 429
    clock.now += 1.0
    await limiter.acquire([USER])


async def test_memory_all_or_nothing() -> None:
    """A request refused by one bucket takes nothing from the others."""
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    tight = Limit("t:x", RateSpec(1.0, 1), "tool")
    await limiter.acquire([tight])
    for _ in range(3):
        with pytest.raises(RateLimited):
            await limiter.acquire([USER, tight])
    await limiter.acquire([USER])
    await limiter.acquire([USER])


async def test_memory_key_count_is_bounded() -> None:
    """Many distinct keys never grow the table past max_keys."""
    limiter = MemoryRateLimiter(clock=Clock(), max_keys=10)
    for i in range(100):
        await limiter.acquire([Limit(f"u:{i}", RateSpec(1.0, 5), "user")])
    assert len(limiter._buckets) <= 10


def test_limits_for() -> None:
    """Per-user always (when set), per-tool only for tool calls."""
    cfg = RateLimitConfig(per_user=RateSpec(5, 10), per_tool=RateSpec(1, 2))
    both = limits_for(cfg, issuer="i", sub="s", server="files", tool="read")
    assert [(limit.key, limit.scope) for limit in both] == [("u:i|s", "user"), ("t:files/read", "tool")]
    assert [limit.scope for limit in limits_for(cfg, issuer="i", sub="s", server="f", tool=None)] == ["user"]


async def test_redis_bucket_burst_and_ttl(redis_limiter: RedisRateLimiter, redis_url: str) -> None:
    """Redis buckets hold the burst, refuse past it with a retry-after, and expire when idle."""
    await redis_limiter.acquire([USER, TOOL])
    await redis_limiter.acquire([USER, TOOL])
    with pytest.raises(RateLimited) as info:
        await redis_limiter.acquire([USER, TOOL])
    assert info.value.scope == "user" and info.value.retry_after >= 1
    admin = Redis.from_url(redis_url)
    try:
        ttl = await admin.pttl(REDIS_KEY_PREFIX + USER.key)
        assert 0 < ttl <= 3000
        # The refused request took nothing from the tool bucket: one token is left.
        left = await admin.hget(REDIS_KEY_PREFIX + TOOL.key, "t")
        assert left is not None and float(left) == pytest.approx(1.0, abs=0.1)
    finally:
        await admin.aclose()


async def test_redis_is_shared_between_instances(redis_limiter: RedisRateLimiter, redis_url: str) -> None:
    """Two limiters (two ext_authz instances) draw from the same bucket."""
    other = RedisRateLimiter(redis_url, timeout=0.5)
    try:
        await redis_limiter.acquire([USER])
        await other.acquire([USER])
        with pytest.raises(RateLimited):
            await redis_limiter.acquire([USER])
    finally:
        await other.close()


async def test_redis_concurrent_requests_are_atomic(redis_limiter: RedisRateLimiter) -> None:
    """Under 50 concurrent requests exactly the burst is granted."""
    limit = Limit("u:iss|burst", RateSpec(0.001, 10), "user")
    results = await asyncio.gather(*(redis_limiter.acquire([limit]) for _ in range(50)),
                                   return_exceptions=True)
    assert sum(r is None for r in results) == 10
    assert all(isinstance(r, RateLimited) for r in results if r is not None)


async def test_redis_down_fails_closed_fast() -> None:
    """With Redis unreachable the limiter refuses (503) and then backs off without retrying."""
    clock = Clock()
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, clock=clock)
    try:
        with pytest.raises(RateLimitUnavailable) as info:
            await limiter.acquire([USER])
        assert info.value.http_status == 503
        with pytest.raises(RateLimitUnavailable):
            await limiter.acquire([USER])  # inside the back-off: no connection attempt
    finally:
        await limiter.close()
