"""A per-backend circuit breaker: closed -> open after N consecutive failures -> half-open probe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Rejection:
    """Why a call was refused without touching the backend."""

    retry_in: float
    failures: int
    last_error: str


class CircuitBreaker:
    """Counts consecutive failed calls; while open, calls fail fast until the cool-down ends.

    After the cool-down exactly one call (the probe) goes through; its outcome closes the circuit
    or opens it for another cool-down. The clock is injectable so tests need no sleeps.
    """

    def __init__(self, failure_threshold: int = 5, cooldown: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or cooldown <= 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown > 0")
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.last_error = ""

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.cooldown:
            return HALF_OPEN
        return self._state

    def acquire(self) -> Rejection | None:
        """None when the call may proceed (the caller must then report success or failure)."""
        state = self.state
        if state == CLOSED:
            return None
        if state == HALF_OPEN and not self._probe_in_flight:
            self._state = HALF_OPEN
            self._probe_in_flight = True
            return None
        retry_in = max(0.0, self._opened_at + self.cooldown - self._clock())
        return Rejection(retry_in=retry_in, failures=self._failures, last_error=self.last_error)

    def record_success(self) -> None:
        self._state = CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self, error: str) -> None:
        self.last_error = error
        self._failures += 1
        if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = OPEN
            self._opened_at = self._clock()
        self._probe_in_flight = False

    def release(self) -> None:
        """The call ended with neither verdict (cancelled): let another probe go."""
        self._probe_in_flight = False
