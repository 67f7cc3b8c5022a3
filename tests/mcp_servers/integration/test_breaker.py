from __future__ import annotations

import pytest

from mcp_servers.integration.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from mcp_servers.integration.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_fails_fast_with_retry_time() -> None:
    """N consecutive failures open the circuit; a rejection says how long until the next attempt."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        assert b.acquire() is None
        b.record_failure("boom")
    assert b.state == CLOSED
    assert b.acquire() is None
    b.record_failure("refused")
    assert b.state == OPEN
    clock.now += 4
    rej = b.acquire()
    assert rej is not None and rej.retry_in == pytest.approx(6) and rej.last_error == "refused"
    assert rej.failures == 3


def test_success_resets_the_count() -> None:
    """A success between failures keeps the circuit closed."""
    b = CircuitBreaker(failure_threshold=2, cooldown=1, clock=Clock())
    b.record_failure("x")
    b.record_success()
    b.record_failure("x")
    assert b.state == CLOSED


def test_half_open_lets_one_probe_through() -> None:
    """After the cool-down exactly one probe passes; its success closes, its failure re-opens."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown=5, clock=clock)
    b.record_failure("x")
    clock.now += 5
    assert b.state == HALF_OPEN
    assert b.acquire() is None
    assert b.acquire() is not None  # second caller while the probe is in flight
    b.record_failure("still down")
    assert b.state == OPEN and b.acquire() is not None
    clock.now += 5
    assert b.acquire() is None
    b.record_success()
    assert b.state == CLOSED and b.acquire() is None


def test_released_probe_frees_the_slot() -> None:
    """A cancelled probe (no verdict) lets the next caller probe."""
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, cooldown=1, clock=clock)
    b.record_failure("x")
    clock.now += 1
    assert b.acquire() is None
    b.release()
    assert b.acquire() is None


def test_cache_expires_and_evicts_least_recently_used() -> None:
    """Entries vanish after the TTL; past max_entries the least recently used goes first."""
    clock = Clock()
    c: TTLCache[int] = TTLCache(ttl=10, max_entries=2, clock=clock)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    clock.now += 10
    assert c.get("a") is None
    off: TTLCache[int] = TTLCache(ttl=0)
    off.put("a", 1)
    assert not off.enabled and off.get("a") is None
