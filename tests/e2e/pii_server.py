"""A small MCP server for the end-to-end tests: tools whose results carry PII.

Run as ``python -m tests.e2e.pii_server --host H --port P``. ``contact`` answers with an email
address and a card number; when the request carries a progressToken it sends progress
notifications first, so the answer is an SSE stream instead of one JSON body. ``tools/list``
with a progressToken does the same, so a list answer can be replayed from a session's stream
(``Last-Event-ID``) too.
"""

from __future__ import annotations

from typing import Any

from mcp_servers.core import MCPServer, ToolContext, ToolResult, serve_main

EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"  # a Luhn-valid test card number
TEXT = f"Customer Alice Smith, {EMAIL}, pays with card {CARD}."
READ_ONLY = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True,
             "openWorldHint": False}


class PiiServer(MCPServer):
    async def dispatch(self, method: str, params: dict[str, Any], ctx: ToolContext,
                       page_size: int) -> dict[str, Any]:
        if method == "tools/list":
            await ctx.progress(0, 1, f"listing for {EMAIL}")
        return await super().dispatch(method, params, ctx, page_size)


def build(_args: Any) -> MCPServer:
    server = PiiServer("pii", version="0.1.0", instructions="Test data with personal information.")

    @server.tool(name="contact", description="The contact record of the demo customer.",
                 input_schema={"type": "object", "properties": {}, "additionalProperties": False},
                 annotations=READ_ONLY)
    async def contact(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        for step in range(3):
            await ctx.progress(step, 3, f"step {step}: {EMAIL}")
        return ToolResult(content=[{"type": "text", "text": TEXT}])

    @server.tool(name="echo", description="Says hello (no personal information).",
                 input_schema={"type": "object", "properties": {}, "additionalProperties": False},
                 annotations=READ_ONLY)
    async def echo(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        return ToolResult(content=[{"type": "text", "text": "hello"}])

    return server


if __name__ == "__main__":
    serve_main(build)
