"""The event loop every gateway process runs on.

    from gateway import eventloop
    eventloop.run(main())

uvloop (libuv, with TLS in Cython) when it is installed, which it is with the gateway's own
requirements: it halves the event loop's share of a call and makes the inner TLS between Envoy
and the services cheap (docs/benchmarks.md, "Event loop"). ``MCP_GATEWAY_EVENT_LOOP=asyncio``
selects the standard library loop instead (for a side-by-side measurement, or to rule the loop
out when debugging); any other value than ``asyncio`` / ``uvloop`` is refused at start-up, so a
typo does not silently measure the wrong thing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

ENV = "MCP_GATEWAY_EVENT_LOOP"
CHOICES = ("uvloop", "asyncio")

T = TypeVar("T")


class EventLoopError(ValueError):
    """The environment asks for an event loop this process cannot run."""


def choice() -> str:
    """The loop this process runs: ``uvloop`` unless the environment says ``asyncio``."""
    wanted = os.environ.get(ENV, "").strip().lower() or "uvloop"
    if wanted not in CHOICES:
        raise EventLoopError(f"{ENV}={os.environ.get(ENV)!r}: expected one of {', '.join(CHOICES)}")
    if wanted == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            if ENV in os.environ:  # asked for by name: not installed is an error, not a fallback
                raise EventLoopError(f"{ENV}=uvloop but uvloop is not installed") from None
            return "asyncio"
    return wanted


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for :class:`asyncio.Runner` (``None``: the standard library's loop)."""
    if choice() == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory()
    except EventLoopError:
        main.close()  # never awaited: close it so no "coroutine was never awaited" warning follows
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
