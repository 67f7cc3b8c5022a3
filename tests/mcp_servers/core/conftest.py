"""A real aiohttp server (loopback, port 0) running a small MCPServer built for the core tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from mcp_servers.core import MCPServer, ServerSettings, ToolContext, ToolError, ToolResult
from mcp_servers.core.app import make_app, transport_of
from mcp_servers.core.transport import Transport

JSON_AND_SSE = "application/json, text/event-stream"


@dataclass
class Gates:
    """Events the test server's handlers use to coordinate with tests (no sleeps)."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    saw_cancel: asyncio.Event = field(default_factory=asyncio.Event)


def build_test_server(gates: Gates) -> MCPServer:
    server = MCPServer("core-test", version="9.9.9", instructions="test server")

    @server.tool(
        name="echo",
        description="Echo text",
        title="Echo",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string"}, "times": {"type": "integer", "minimum": 1}},
            "required": ["text"],
            "additionalProperties": False,
        },
        annotations={"readOnlyHint": True},
    )
    async def echo(_ctx: ToolContext, args: dict[str, Any]) -> str:
        return str(args["text"]) * int(args.get("times", 1))

    @server.tool(
        name="structured",
        description="Structured output",
        input_schema={"type": "object"},
        output_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    )
    async def structured(_ctx: ToolContext, _args: dict[str, Any]) -> dict[str, Any]:
        return {"n": 7}

    @server.tool(
        name="broken_output",
        description="Breaks its outputSchema",
        input_schema={"type": "object"},
        output_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    )
    async def broken(_ctx: ToolContext, _args: dict[str, Any]) -> dict[str, Any]:
        return {"n": "seven"}

    @server.tool(name="fail", description="Raises ToolError", input_schema={"type": "object"})
    async def fail(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        raise ToolError("the thing failed; try again with a smaller input")

    @server.tool(name="crash", description="Has a bug", input_schema={"type": "object"})
    async def crash(_ctx: ToolContext, _args: dict[str, Any]) -> str:
        raise KeyError("bug")

    @server.tool(name="progress", description="Reports progress", input_schema={"type": "object"})
    async def progress(ctx: ToolContext, _args: dict[str, Any]) -> ToolResult:
        for i in range(3):
            await ctx.progress(i + 1, 3)
        await ctx.log("info", {"done": True})
        return ToolResult(content=[{"type": "text", "text": "done"}])

    @server.tool(name="slow", description="Waits for the test", input_schema={"type": "object"})
    async def slow(ctx: ToolContext, _args: dict[str, Any]) -> str:
        gates.started.set()
        waiters = {asyncio.ensure_future(gates.release.wait()), asyncio.ensure_future(ctx.cancelled.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=30)
        finally:
            for w in waiters:
                w.cancel()
        if ctx.cancelled.is_set():
            gates.saw_cancel.set()
            return "cancelled"
        return "finished"

    @server.tool(name="ask_llm", description="Sampling round trip", input_schema={"type": "object"})
    async def ask_llm(ctx: ToolContext, _args: dict[str, Any]) -> str:
        result = await ctx.sample([{"role": "user", "content": {"type": "text", "text": "hi"}}], 10)
        return f"llm said {result['content']['text']}"

    @server.tool(name="ask_user", description="Elicitation round trip", input_schema={"type": "object"})
    async def ask_user(ctx: ToolContext, _args: dict[str, Any]) -> str:
        result = await ctx.elicit("name?", {"type": "object", "properties": {"name": {"type": "string"}}})
        return f"user said {result['content']['name']}"

    @server.tool(name="whoami", description="Identity headers", input_schema={"type": "object"})
    async def whoami(ctx: ToolContext, _args: dict[str, Any]) -> dict[str, Any]:
        return {"user": ctx.user, "tenant": ctx.tenant, "roles": list(ctx.roles or ())}

    @server.tool(name="touch", description="Notifies resource update", input_schema={"type": "object"})
    async def touch(ctx: ToolContext, _args: dict[str, Any]) -> str:
        await ctx.notify_resource_updated("test://doc")
        await ctx.notify_list_changed("tools")
        return "ok"

    @server.resource(uri="test://doc", name="doc", mime_type="text/plain")
    async def doc(_ctx: ToolContext) -> str:
        return "hello"

    @server.resource_template(uri_template="test://items/{id}", name="item")
    async def item(_ctx: ToolContext, uri: str, params: dict[str, str]) -> tuple[bytes, str]:
        if params["id"] == "missing":
            from mcp_servers.core import ResourceNotFound

            raise ResourceNotFound(uri)
        return params["id"].encode(), "application/octet-stream"

    @server.resource_lister
    async def listed(_ctx: ToolContext) -> list[dict[str, Any]]:
        return [{"uri": f"test://items/{i}", "name": f"item {i}"} for i in range(3)]

    @server.prompt(name="greet", description="Greets", arguments=[{"name": "who", "required": True}])
    async def greet(_ctx: ToolContext, args: dict[str, str]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": {"type": "text", "text": f"hello {args['who']}"}}]

    @server.completion
    async def complete(_ctx: ToolContext, _ref: dict[str, Any], argument: dict[str, str]) -> list[str]:
        return [w for w in ("alice", "alfred", "bob") if w.startswith(argument["value"])]

    return server


class Client:
    """Raw HTTP MCP client: exactly the bytes and headers a test wants."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.session_id: str | None = None
        self.version = "2025-11-25"
        self.user: str | None = None
        # Identity headers beyond x-mcp-user (issuer, tenant) sent with every request.
        self.identity: dict[str, str] = {}
        self._next = 0

    def headers(self, extra: dict[str, str] | None = None, accept: str = JSON_AND_SSE) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": accept, "MCP-Protocol-Version": self.version}
        if self.session_id is not None:
            h["Mcp-Session-Id"] = self.session_id
        if self.user is not None:
            h["x-mcp-user"] = self.user
        h.update(self.identity)
        h.update(extra or {})
        return h

    def next_id(self) -> int:
        self._next += 1
        return self._next

    async def initialize(
        self, version: str = "2025-11-25", user: str | None = None,
        capabilities: dict[str, Any] | None = None, identity: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": JSON_AND_SSE}
        self.user = user
        self.identity = dict(identity or {})
        if user is not None:
            headers["x-mcp-user"] = user
        headers.update(self.identity)
        body = {
            "jsonrpc": "2.0",
            "id": self.next_id(),
            "method": "initialize",
            "params": {
                "protocolVersion": version,
                "capabilities": capabilities or {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        async with self.http.post(self.url, data=orjson.dumps(body), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            self.session_id = resp.headers["Mcp-Session-Id"]
            data: dict[str, Any] = await resp.json()
        self.version = data["result"]["protocolVersion"]
        async with self.http.post(
            self.url,
            data=orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            headers=self.headers(),
        ) as resp:
            assert resp.status == 202
        return data

    async def raw(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.post(self.url, data=body, headers=headers or self.headers()) as resp:
            text = await resp.read()
            return resp.status, orjson.loads(text) if text else None

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        accept: str = "application/json",
    ) -> tuple[int, Any]:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id(), "method": method}
        if params is not None:
            body["params"] = params
        return await self.raw(orjson.dumps(body), self.headers(headers, accept=accept))

    async def ping_ok(self) -> bool:
        status, body = await self.call("ping")
        return status == 200 and body["result"] == {}


async def read_sse(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yield the JSON messages of an SSE response as they arrive (priming events skipped)."""
    data: list[bytes] = []
    async for raw in resp.content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data and any(data):
                yield orjson.loads(b"\n".join(data))
            data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip())


@dataclass
class Served:
    url: str
    client: Client
    http: aiohttp.ClientSession
    gates: Gates
    transport: Transport
    runner: web.AppRunner
    base: str


async def start(settings: ServerSettings | None = None) -> Served:
    gates = Gates()
    app = make_app(build_test_server(gates), settings or ServerSettings(page_size=2))
    runner = web.AppRunner(app, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    return Served(
        url=base + "/mcp",
        client=Client(http, base + "/mcp"),
        http=http,
        gates=gates,
        transport=transport_of(app),
        runner=runner,
        base=base,
    )


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    s = await start()
    try:
        yield s
    finally:
        await s.http.close()
        await s.runner.cleanup()
