"""The event loop the gateway's processes run on (gateway.eventloop)."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

from gateway import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, a process runs on uvloop (installed with the gateway's requirements)."""
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.choice() == "uvloop"
    assert eventloop.run(_loop_module()).startswith("uvloop")


def test_the_environment_selects_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """MCP_GATEWAY_EVENT_LOOP=asyncio runs the standard library's loop (for side-by-side
    measurements); the value is read case-insensitively."""
    monkeypatch.setenv(eventloop.ENV, " AsyncIO ")
    assert eventloop.run(_loop_module()) == "asyncio.unix_events"


def test_an_unknown_loop_is_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo is an error naming the variable and the choices, not a silent fallback, and the
    coroutine is closed rather than left never awaited."""
    monkeypatch.setenv(eventloop.ENV, "uvlop")
    coro = _loop_module()
    with pytest.raises(eventloop.EventLoopError, match="MCP_GATEWAY_EVENT_LOOP='uvlop'.*uvloop, asyncio"):
        eventloop.run(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_every_service_entry_point_goes_through_gateway_eventloop() -> None:
    """Every process entry point (each package's __main__, the servers' runners) starts its loop
    with gateway.eventloop.run: a new one calling asyncio.run directly would run without uvloop."""
    root = Path(__file__).resolve().parents[2]
    entries = [*root.glob("*/__main__.py"), *root.glob("*/*/__main__.py"),
               root / "mcp_servers/core/app.py", root / "mcp_servers/erp_demo/serve.py"]
    assert len(entries) >= 6
    direct = [str(p.relative_to(root)) for p in entries if "asyncio.run(" in p.read_text("utf-8")]
    assert direct == []
