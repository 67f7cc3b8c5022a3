"""Fan-out: run one leg per server at once, each under its own timeout, and sort the outcomes
into answers, servers that are unavailable (logged and counted) and servers that refused the
caller (left out quietly: the caller may not use them)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import Counter

from gateway.telemetry.metrics import NAMESPACE, bounded
from mcp_aggregator.errors import TIMEOUT, UpstreamDenied, UpstreamFailed

logger = logging.getLogger(__name__)

T = TypeVar("T")

UNAVAILABLE = Counter(
    "aggregate_upstream_unavailable",
    "Legs of the aggregator that got no usable answer, by server, JSON-RPC method and reason "
    "(unreachable, timeout, http_error, bad_answer, session_lost, rpc_error).",
    ["server", "method", "reason"], namespace=NAMESPACE,
)
LEGS = Counter(
    "aggregate_legs", "Legs of the aggregator to per-server routes, by server, method and outcome "
    "(ok, unavailable, denied).", ["server", "method", "outcome"], namespace=NAMESPACE,
)


def record_unavailable(server: str, method: str, reason: str, detail: str) -> None:
    """Count and log one server left out of an answer."""
    UNAVAILABLE.labels(bounded("server", server), method, reason).inc()
    logger.warning("server %s left out of %s: %s", server, method, detail,
                   extra={"server": server, "method": method, "reason": reason})


@dataclass(slots=True)
class FanOut(Generic[T]):
    """Answers by server (in the order asked), unavailable servers with their reason, and
    servers whose route refused the caller."""

    answers: dict[str, T] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    denied: set[str] = field(default_factory=set)

    def unavailable_meta(self) -> list[dict[str, str]]:
        return [{"server": s, "reason": r} for s, r in self.unavailable.items()]


async def fan_out(servers: Sequence[str], leg: Callable[[str], Awaitable[T]], *, leg_timeout: float,
                  method: str) -> FanOut[T]:
    """Run ``leg(server)`` for every server at once; each is cancelled after ``leg_timeout`` seconds.
    A leg's own bug propagates (it is not an unavailable server)."""

    async def bounded_leg(server: str) -> T:
        async with asyncio.timeout(leg_timeout):
            return await leg(server)

    tasks = {server: asyncio.create_task(bounded_leg(server)) for server in servers}
    try:
        if tasks:
            await asyncio.wait(tasks.values())
    finally:
        for task in tasks.values():
            task.cancel()
    out: FanOut[T] = FanOut()
    for server, task in tasks.items():
        exc = task.exception()
        if exc is None:
            out.answers[server] = task.result()
            LEGS.labels(bounded("server", server), method, "ok").inc()
        elif isinstance(exc, UpstreamDenied):
            out.denied.add(server)
            LEGS.labels(bounded("server", server), method, "denied").inc()
            logger.info("server %s refused the caller on %s", server, method,
                        extra={"server": server, "method": method, "reason": exc.code})
        elif isinstance(exc, (UpstreamFailed, TimeoutError)):
            reason = exc.reason if isinstance(exc, UpstreamFailed) else TIMEOUT
            detail = exc.message if isinstance(exc, UpstreamFailed) else f"no answer within {leg_timeout:g} s"
            out.unavailable[server] = reason
            LEGS.labels(bounded("server", server), method, "unavailable").inc()
            record_unavailable(server, method, reason, detail)
        else:
            raise exc
    return out
