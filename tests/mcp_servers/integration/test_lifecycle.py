"""The connector's backend session follows the app's lifecycle and carries the trace onward."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from mcp_servers.core import ServerSettings, make_app
from mcp_servers.integration.credentials import NoCredentials
from mcp_servers.integration.server import ConnectorConfig, build_connector

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DOC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Items", "version": "1"},
    "paths": {"/items": {"get": {
        "operationId": "listItems", "summary": "List items",
        "responses": {"200": {"description": "ok", "content": {"application/json": {
            "schema": {"type": "object", "properties": {"items": {"type": "array"}}}}}}},
    }}},
}


async def test_backend_session_opens_at_start_closes_at_stop_and_propagates_trace() -> None:
    """Start-up opens the pooled session, a call forwards traceparent, clean-up closes the session."""
    seen: list[str | None] = []

    async def items(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({"items": [1, 2]})

    backend_app = web.Application()
    backend_app.router.add_get("/items", items)
    backend = web.AppRunner(backend_app)
    await backend.setup()
    await web.TCPSite(backend, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{backend.addresses[0][1]}"
    server = build_connector(ConnectorConfig(name="items", openapi="inline", base_url=base_url,
                                             allow=("listItems",), allow_all=False, tool_prefix="",
                                             credentials=NoCredentials(), client={}), DOC)
    runner = web.AppRunner(make_app(server, ServerSettings()))
    try:
        await runner.setup()
        assert not server.client.session.closed
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "listItems", "arguments": {}, "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {}}}})
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "listItems",
                   "traceparent": TRACEPARENT}
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/mcp"
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as resp:
            answer = await resp.json()
        assert resp.status == 200 and answer["result"]["structuredContent"] == {"items": [1, 2]}
        (forwarded,) = seen
        assert forwarded is not None and forwarded.split("-")[1] == TRACEPARENT.split("-")[1]
    finally:
        await runner.cleanup()
        await backend.cleanup()
    with pytest.raises(RuntimeError, match="before start"):
        _ = server.client.session
