"""Health, readiness and graceful shutdown of the aiohttp application."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from mcp_servers.core import MCPServer, ServerSettings, ToolContext, serve_main
from mcp_servers.core.app import add_common_arguments, make_app, settings_from_args
from tests.mcp_servers.core.conftest import Client, Served, start


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


def _lifecycle_server(events: list[str], *, fail_startup: bool = False) -> MCPServer:
    server = MCPServer("lifecycle")

    @server.on_startup
    async def open_pool() -> None:
        events.append("open pool")

    @server.lifespan
    async def session() -> AsyncIterator[None]:
        events.append("open session")
        yield
        events.append("close session")

    @server.on_startup
    async def maybe_fail() -> None:
        if fail_startup:
            raise OSError("backend unreachable")

    @server.on_cleanup
    async def close_pool() -> None:
        events.append("close pool")

    @server.tool(name="use", description="Uses the resources", input_schema={"type": "object"})
    async def use(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        events.append("call")
        return "used"

    return server


async def test_lifecycle_hooks_run_around_serving_in_order() -> None:
    """Start-up hooks run before the first request, clean-ups after it, in reverse order."""
    events: list[str] = []
    runner = web.AppRunner(make_app(_lifecycle_server(events), ServerSettings()))
    await runner.setup()
    try:
        assert events == ["open pool", "open session"]
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        async with aiohttp.ClientSession() as http:
            client = Client(http, f"http://127.0.0.1:{runner.addresses[0][1]}/mcp")
            await client.initialize()
            status, _ = await client.call("tools/call", {"name": "use", "arguments": {}})
            assert status == 200
    finally:
        await runner.cleanup()
    assert events == ["open pool", "open session", "call", "close pool", "close session"]


async def test_failed_startup_stops_and_cleans_up_what_started() -> None:
    """A failing start-up hook aborts the start; lifespans that already started are torn down."""
    events: list[str] = []
    runner = web.AppRunner(make_app(_lifecycle_server(events, fail_startup=True), ServerSettings()))
    with pytest.raises(OSError, match="backend unreachable"):
        await runner.setup()
    await runner.cleanup()
    assert events == ["open pool", "open session", "close session"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_serve_main_configures_logging_before_build(capsys: pytest.CaptureFixture[str],
                                                   restore_logging: None) -> None:
    """What build() logs (seeding, backend choice) reaches stderr as JSON, not the void."""
    def build(_args: argparse.Namespace) -> MCPServer:
        logging.getLogger("mcp_servers.test").info("seeded %d rows", 3)
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        serve_main(build, argv=["--port", "0"])
    (event,) = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert event["message"] == "seeded 3 rows" and event["level"] == "INFO"


def test_common_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """--otlp-endpoint defaults to $OTEL_EXPORTER_OTLP_ENDPOINT; audit and path settings are checked."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--audit-file", "/tmp/a.jsonl"]))
    assert settings.otlp_endpoint == "http://127.0.0.1:4317" and settings.audit_file == "/tmp/a.jsonl"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    assert settings_from_args(parser.parse_args([])).otlp_endpoint is None
    with pytest.raises(ValueError, match="metrics"):
        ServerSettings(path="/metrics")
    with pytest.raises(ValueError, match="OTLP"):
        ServerSettings(audit_file="/tmp/a.jsonl", audit_otlp_export=True)
