"""The minimal MCP client that fetches listings, against a real aiohttp MCP server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.catalog.client import FetchError, fetch_listing
from tests.gateway.catalog.mcp_stub import TOOLS, Stub, start

IDENTITY = {"x-mcp-user": "system:test"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def test_session_flow_with_pagination_and_sse(http: aiohttp.ClientSession) -> None:
    """initialize, initialized, every tools/list page (JSON then SSE), resources; session ended."""
    stub = Stub()
    runner, port = await start(stub)
    try:
        listing = await fetch_listing(http, f"http://127.0.0.1:{port}/mcp", headers=IDENTITY)
    finally:
        await runner.cleanup()
    assert listing.tools == TOOLS
    assert [r["uri"] for r in listing.resources] == ["file:///readme.md"]
    assert listing.prompts == []  # not in the server's capabilities: never asked
    methods = [r.get("method") for r in stub.requests]
    assert methods == ["initialize", "notifications/initialized", "tools/list", "tools/list",
                       "resources/list"]
    assert all(h.get("x-mcp-user") == "system:test" for h in stub.headers)
    assert stub.headers[2]["Mcp-Session-Id"] == "s-1"
    assert stub.headers[2]["MCP-Protocol-Version"] == "2025-11-25"
    assert stub.deleted == 1


async def test_stateless_protocol(http: aiohttp.ClientSession) -> None:
    """2026-07-28: no initialize; Mcp-Method and _meta on every request; unknown lists are empty."""
    stub = Stub(stateless=True)
    runner, port = await start(stub)
    try:
        listing = await fetch_listing(http, f"http://127.0.0.1:{port}/mcp", headers=IDENTITY,
                                      protocol_version="2026-07-28")
    finally:
        await runner.cleanup()
    assert listing.tools == TOOLS and listing.prompts == []
    assert [r["method"] for r in stub.requests] == ["tools/list", "tools/list", "resources/list",
                                                    "prompts/list"]
    assert stub.requests[0]["params"]["_meta"] == {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}


async def test_unreachable_server(http: aiohttp.ClientSession) -> None:
    """A server that is not listening gives a FetchError, not a hang or a crash."""
    stub = Stub()
    runner, port = await start(stub)
    await runner.cleanup()
    with pytest.raises(FetchError):
        await fetch_listing(http, f"http://127.0.0.1:{port}/mcp", headers=IDENTITY)
