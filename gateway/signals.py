"""SIGINT/SIGTERM as an asyncio event: how every long-running process of the gateway stops."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


def stop_event() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM (main thread, Unix)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGINT or SIGTERM, then ``await stop()`` (also when the wait is cancelled)."""
    try:
        await stop_event().wait()
    finally:
        await stop()
