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
READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True,
             "openWorldHint": False}


def build_server(args: argparse.Namespace | None = None) -> MCPServer:
    server = MCPServer("bench", version="1.0.0",
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
