"""Three real ``mcp_servers.core`` servers behind a stand-in for Envoy's per-server routes
(``/mcp/<server>`` on one loopback port, port 0), and the aggregator in front of them.

The stand-in does what the gateway's route does for the aggregator's legs: it turns the
``Authorization`` header into the identity header the servers read (ext_authz's job) and drops
it, records what each leg carried, and answers 503 like Envoy for a server marked down.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.aggregate.session_token import AggregateSession, SessionSealer
from gateway.aggregate.views import AGGREGATE_VIEW, View, aggregate_view, virtual_view
from mcp_aggregator.app import AGGREGATOR_KEY, Aggregator, make_app
from mcp_aggregator.sessions import MemoryFacts
from mcp_aggregator.settings import AggregatorSettings
from mcp_servers.core import MCPServer, ServerSettings, ToolContext
from mcp_servers.core.transport import Transport

SERVERS = ("alpha", "beta", "gamma")
JSON_AND_SSE = "application/json, text/event-stream"
TOOLS = ("read_a", "read_b", "write_c", "notify")


def build_server(name: str) -> MCPServer:
    server = MCPServer(name, instructions=f"the {name} server")
    for tool in TOOLS[:3]:
        @server.tool(name=tool, title=f"{name} {tool}", description=f"{tool} of {name}",
                     input_schema={"type": "object"},
                     output_schema={"type": "object", "properties": {"who": {"type": "string"}}})
        async def handler(ctx: ToolContext, _args: dict[str, Any], _tool: str = tool) -> dict[str, Any]:
            return {"who": ctx.user or ""}

    @server.tool(name="notify", description="announces a list change", input_schema={"type": "object"})
    async def notify(ctx: ToolContext, _args: dict[str, Any]) -> str:
        await ctx.notify_list_changed("tools")
        return "ok"

    @server.tool(name="ask", description="asks the user", input_schema={"type": "object"})
    async def ask(ctx: ToolContext, _args: dict[str, Any]) -> str:
        result = await ctx.elicit("name?", {"type": "object", "properties": {"name": {"type": "string"}}})
        return f"user said {result['content']['name']}"

    @server.resource(uri=f"test://{name}/doc", name="doc", mime_type="text/plain")
    async def doc(_ctx: ToolContext) -> str:
        return name

    @server.resource_template(uri_template=f"test://{name}/items/{{id}}", name="item")
    async def item(_ctx: ToolContext, _uri: str, params: dict[str, str]) -> str:
        return params["id"]

    @server.prompt(name="greet", title="Greeting", description="greets")
    async def greet(_ctx: ToolContext, _args: dict[str, str]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": {"type": "text", "text": "hi"}}]

    return server


@dataclass
class FakeEnvoy:
    """The per-server routes: a server's transport at /mcp/<server>, down on demand."""

    transports: dict[str, Transport]
    down: set[str] = field(default_factory=set)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    async def route(self, request: web.Request) -> web.StreamResponse:
        server = request.match_info["server"]
        transport = self.transports.get(server)
        if transport is None or server in self.down:
            return web.Response(status=503, text="no healthy upstream")
        self.seen.append((server, request.method, dict(request.headers)))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            headers["x-mcp-user"] = auth.removeprefix("Bearer ")
        return await transport.handle(request.clone(headers=headers))


@dataclass
class Stack:
    envoy: FakeEnvoy
    aggregator: Aggregator
    url: str
    base: str
    http: aiohttp.ClientSession
    sealer: SessionSealer
    facts: MemoryFacts
    envoy_base: str

    def token(self, sid: str) -> AggregateSession:
        return self.sealer.open(sid)


def views(servers: tuple[str, ...]) -> dict[str, View]:
    return {AGGREGATE_VIEW: aggregate_view(servers),
            "readers": virtual_view("readers", ("alpha/read_*", "beta/read_a"), servers)}


async def _start(runner: web.AppRunner) -> str:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    transports = {name: Transport(build_server(name), ServerSettings(page_size=2)) for name in SERVERS}
    envoy = FakeEnvoy(transports)
    envoy_app = web.Application()
    envoy_app.router.add_route("*", "/mcp/{server}", envoy.route)
    envoy_runner = web.AppRunner(envoy_app, shutdown_timeout=2)
    envoy_base = await _start(envoy_runner)
    keys = (os.urandom(32),)
    settings = AggregatorSettings(upstream_base=envoy_base, views=views(SERVERS), keys=keys,
                                  leg_timeout=5.0, stream_backoff=0.01, stream_backoff_max=0.05,
                                  sse_keepalive=5.0, drain_seconds=0)
    facts = MemoryFacts()
    app = make_app(settings, facts)
    runner = web.AppRunner(app, shutdown_timeout=2)
    base = await _start(runner)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        yield Stack(envoy=envoy, aggregator=app[AGGREGATOR_KEY], url=base + "/mcp", base=base, http=http,
                    sealer=SessionSealer(keys), facts=facts, envoy_base=envoy_base)
    finally:
        await http.close()
        await runner.cleanup()
        for transport in transports.values():
            await transport.begin_shutdown()
        await envoy_runner.cleanup()
        for transport in transports.values():
            await transport.close()


class RawClient:
    """Exactly the bytes and headers a test wants, against one endpoint."""

    def __init__(self, http: aiohttp.ClientSession, url: str, user: str = "alice") -> None:
        self.http = http
        self.url = url
        self.token = user
        self.session_id: str | None = None
        self.version = "2025-11-25"
        self._next = 0

    def headers(self, accept: str = JSON_AND_SSE) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": accept, "MCP-Protocol-Version": self.version,
             "Authorization": f"Bearer {self.token}", "x-mcp-user": self.token}
        if self.session_id is not None:
            h["Mcp-Session-Id"] = self.session_id
        return h

    async def post(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.post(self.url, data=orjson.dumps(body), headers=headers or self.headers()) as r:
            raw = await r.read()
            if "Mcp-Session-Id" in r.headers and body.get("method") == "initialize":
                self.session_id = r.headers["Mcp-Session-Id"]
            return r.status, orjson.loads(raw) if raw else None

    async def initialize(self, version: str = "2025-11-25",
                         capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        self.version = version
        status, body = await self.request("initialize", {"protocolVersion": version,
                                                         "capabilities": capabilities or {},
                                                         "clientInfo": {"name": "t", "version": "1"}})
        assert status == 200, body
        note = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note[0] == 202
        result: dict[str, Any] = body["result"]
        return result

    async def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        self._next += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next, "method": method}
        if params is not None:
            body["params"] = params
        return await self.post(body)

    async def list_all(self, method: str, key: str) -> tuple[list[dict[str, Any]], int]:
        """Every entry of a paged list, and the number of pages."""
        entries: list[dict[str, Any]] = []
        cursor: str | None = None
        for pages in range(1, 50):
            status, body = await self.request(method, {"cursor": cursor} if cursor else {})
            assert status == 200 and "result" in body, body
            entries += body["result"][key]
            cursor = body["result"].get("nextCursor")
            if cursor is None:
                return entries, pages
        raise AssertionError("the list did not end")


async def wait_for(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 10)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
