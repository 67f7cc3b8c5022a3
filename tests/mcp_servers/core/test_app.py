"""Health, readiness and graceful shutdown of the aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.mcp_servers.core.conftest import Served, start


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)  # yield to the server task; the caller bounds the wait


async def test_health_and_ready(served: Served) -> None:
    """/health and /ready answer 200 while serving."""
    async with served.http.get(served.base + "/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with served.http.get(served.base + "/ready") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True
    await served.transport.begin_shutdown()
    async with served.http.get(served.base + "/ready") as resp:
        assert resp.status == 503


async def test_graceful_shutdown_finishes_in_flight_call() -> None:
    """runner.cleanup() waits for an in-flight tools/call, which still gets its result."""
    s = await start()
    try:
        await s.client.initialize()
        call = asyncio.create_task(s.client.call("tools/call", {"name": "slow", "arguments": {}}))
        await asyncio.wait_for(s.gates.started.wait(), 10)
        cleanup = asyncio.create_task(s.runner.cleanup())
        # Shutdown has begun (not ready) but waits for the call.
        await asyncio.wait_for(_until(lambda: not s.transport.ready), 10)
        assert not cleanup.done()
        s.gates.release.set()
        status, body = await asyncio.wait_for(call, 10)
        assert status == 200
        assert body["result"]["content"][0]["text"] == "finished"
        await asyncio.wait_for(cleanup, 10)
    finally:
        await s.http.close()
