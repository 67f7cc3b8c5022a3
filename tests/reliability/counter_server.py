"""An MCP server with side effects the fault and bad-input tests count on the server side.

Run as ``python -m tests.reliability.counter_server --port P --ledger FILE``. Every executed
``tools/call`` appends one JSON line to the ledger (shared by all instances; ``O_APPEND`` writes
of one short line are atomic), so a test can tell whether a call ran, where, and how often.
Every request that reaches ``/mcp`` also appends the headers the gateway forwarded, so a test can
see what Envoy stripped or overwrote.

Tools: ``bump`` (record ``id``), ``slow`` (record ``start``, wait ``ms``, record ``done``),
``whoami`` (the identity the gateway asserted), ``contact`` (a result with PII for ext_proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.signals import stop_event
from mcp_servers.core import MCPServer, ToolContext, ToolResult
from mcp_servers.core.app import add_common_arguments, make_app, settings_from_args, transport_of
from mcp_servers.core.logs import configure_logging

EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
SEEN_HEADERS = ("authorization", "x-forwarded-for", "x-real-ip", "x-envoy-external-address",
                "x-mcp-inspect")
ID_SCHEMA = {"type": "object", "properties": {"id": {"type": "string", "maxLength": 200}},
             "required": ["id"], "additionalProperties": False}


def append_line(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def build(ledger: Path, port: int) -> MCPServer:
    server = MCPServer("counter", version="0.1.0", instructions="Counts calls for fault tests.")

    def record(event: str, ctx: ToolContext, call_id: str) -> None:
        append_line(ledger, {"event": event, "id": call_id, "port": port, "user": ctx.user})

    @server.tool(name="bump", description="Record one execution of the call `id`.",
                 input_schema=ID_SCHEMA)
    async def bump(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        record("bump", ctx, args["id"])
        return ToolResult(content=[{"type": "text", "text": f"bumped {args['id']} on {port}"}])

    @server.tool(name="slow", description="Record start, wait `ms` milliseconds, record done.",
                 input_schema={"type": "object", "additionalProperties": False,
                               "required": ["id", "ms"],
                               "properties": {"id": {"type": "string", "maxLength": 200},
                                              "ms": {"type": "integer", "minimum": 0,
                                                     "maximum": 20000}}})
    async def slow(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        record("start", ctx, args["id"])
        # The slowness is the behaviour under test (a long tool call), not a readiness wait.
        await asyncio.sleep(args["ms"] / 1000)
        record("done", ctx, args["id"])
        return ToolResult(content=[{"type": "text", "text": f"slow {args['id']} on {port}"}])

    @server.tool(name="whoami", description="The identity the gateway asserted for the caller.",
                 input_schema={"type": "object", "properties": {}, "additionalProperties": False})
    async def whoami(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        ident = {"user": ctx.user, "tenant": ctx.tenant, "client_id": ctx.client_id,
                 "roles": list(ctx.roles or ())}
        return ToolResult(content=[{"type": "text", "text": json.dumps(ident)}], structured=ident)

    @server.tool(name="contact", description="A customer record with an email and a card number.",
                 input_schema={"type": "object", "properties": {}, "additionalProperties": False})
    async def contact(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        return ToolResult(content=[{"type": "text",
                                    "text": f"Customer Alice, {EMAIL}, card {CARD}."}])

    return server


def header_recorder(path: Path) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path == "/mcp":
            seen = {k.lower(): v for k, v in request.headers.items()
                    if k.lower().startswith("x-mcp-") or k.lower() in SEEN_HEADERS}
            append_line(path, {"request_id": request.headers.get("x-request-id"), "headers": seen})
        return await handler(request)
    return middleware


async def serve(args: argparse.Namespace) -> None:
    settings = settings_from_args(args)
    ledger = Path(args.ledger)
    app = make_app(build(ledger, settings.port), settings)
    app.middlewares.append(header_recorder(ledger.with_suffix(".headers.jsonl")))
    runner = web.AppRunner(app, shutdown_timeout=settings.shutdown_timeout, access_log=None,
                           handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    stop = stop_event()
    try:
        await stop.wait()
        # As mcp_servers.core.run_server: not ready first, then close the listener and let
        # in-flight calls finish within shutdown_timeout.
        await transport_of(app).begin_shutdown()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    parser.add_argument("--ledger", required=True, help="JSON-lines file of executed calls")
    args = parser.parse_args()
    configure_logging("counter", args.log_level)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
