"""A tiny real MCP server (aiohttp) that answers initialize and paginated */list requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

TOOLS = [
    {"name": "read_file", "description": "Read a file",
     "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "list_dir", "description": "List a directory",
     "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}}},
    {"name": "search", "description": "Search files",
     "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}},
]
RESOURCES = [{"uri": "file:///readme.md", "name": "readme", "mimeType": "text/markdown"}]


@dataclass
class Stub:
    tools: list[dict[str, Any]] = field(default_factory=lambda: [dict(t) for t in TOOLS])
    page_size: int = 2
    stateless: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    deleted: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self.handle)
        app.router.add_delete("/mcp", self.delete)
        return app

    async def delete(self, request: web.Request) -> web.Response:
        self.deleted += 1
        return web.Response(status=204)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        msg = orjson.loads(await request.read())
        self.requests.append(msg)
        self.headers.append(dict(request.headers))
        method = msg.get("method")
        if "id" not in msg:
            return web.Response(status=202)
        if self.stateless and request.headers.get("Mcp-Method") != method:
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"],
                                      "error": {"code": -32020, "message": "Mcp-Method mismatch"}},
                                     status=400)
        if method == "initialize":
            if self.stateless:
                return web.json_response({"jsonrpc": "2.0", "id": msg["id"],
                                          "error": {"code": -32601, "message": "no initialize"}})
            init = {"protocolVersion": msg["params"]["protocolVersion"],
                    "capabilities": {"tools": {}, "resources": {}},
                    "serverInfo": {"name": "stub", "version": "1"}}
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": init},
                                     headers={"Mcp-Session-Id": "s-1"})
        if method == "tools/list":
            start = int(msg.get("params", {}).get("cursor") or 0)
            page = self.tools[start:start + self.page_size]
            result: dict[str, Any] = {"tools": page}
            if start + self.page_size < len(self.tools):
                result["nextCursor"] = str(start + self.page_size)
            body = {"jsonrpc": "2.0", "id": msg["id"], "result": result}
            if start:  # later pages come back as SSE, with a notification first
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info"}}
                await resp.write(b": hi\n\ndata: " + orjson.dumps(note) + b"\n\nevent: message\ndata: ")
                await resp.write(orjson.dumps(body) + b"\n\n")
                await resp.write_eof()
                return resp
            return web.json_response(body)
        if method == "resources/list":
            return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": {"resources": RESOURCES}})
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"],
                                  "error": {"code": -32601, "message": f"unknown method {method}"}})


async def start(stub: Stub) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(stub.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


@contextmanager
def running_in_thread(stub: Stub) -> Iterator[int]:
    """Serve the stub from a background thread (for code that calls asyncio.run itself)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["runner"], box["port"] = loop.run_until_complete(start(stub))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10), "stub server did not start"
    try:
        yield int(box["port"])
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
