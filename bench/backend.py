"""The one MCP server behind every benchmarked configuration, built on ``mcp_servers.core``.

    python -m bench.backend --host 127.0.0.1 --port 9300

Tools: ``echo`` returns its (about 1 KB) arguments; ``report`` returns about 10 KB of text with
emails, phone numbers and card numbers, the workload of PII masking in the full gateway. It
answers stateless 2026-07-28 requests and initialize-based sessions alike (the core does both), so
ContextForge can use it as an ordinary MCP server.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.payloads import report_text
from mcp_servers.core import MCPServer, ToolContext, serve_main

ECHO_SCHEMA: dict[str, Any] = {"type": "object", "additionalProperties": True}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
    "additionalProperties": False,
}
# 2026-07-28 requires ttlMs/cacheScope freshness hints on these results; clients built on the SDK
# (ContextForge among them) reject a tools/list without them. Until mcp_servers.core adds them
# itself, the bench backend does, so every configuration sees a conforming server.
CACHEABLE = frozenset({"server/discover", "tools/list", "resources/list",
                       "resources/templates/list", "resources/read", "prompts/list"})
CACHE_HINTS = {"ttlMs": 0, "cacheScope": "private"}
READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True,
             "openWorldHint": False}


class BenchServer(MCPServer):
    async def dispatch(self, method: str, params: dict[str, Any], ctx: ToolContext,
                       page_size: int) -> dict[str, Any]:
        result = await super().dispatch(method, params, ctx, page_size)
        if method in CACHEABLE and ctx.protocol_version >= "2026-07-28":
            result = {**CACHE_HINTS, **result}
        return result


def build_server(args: argparse.Namespace | None = None) -> MCPServer:
    server = BenchServer("bench", version="1.0.0",
                       instructions="Benchmark backend: echo and a PII-laden report.")
    default_report = report_text()

    @server.tool(name="echo", description="Return the arguments unchanged.",
                 input_schema=ECHO_SCHEMA, annotations=READ_ONLY)
    async def echo(ctx: ToolContext, arguments: dict[str, Any]) -> dict[str, Any]:
        return arguments

    @server.tool(name="report", description="A 10 KB customer report (contains PII).",
                 input_schema=REPORT_SCHEMA, annotations=READ_ONLY)
    async def report(ctx: ToolContext, arguments: dict[str, Any]) -> str:
        size = arguments.get("size")
        return default_report if size is None else report_text(int(size))

    return server


if __name__ == "__main__":
    serve_main(build_server)
