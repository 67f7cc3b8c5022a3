"""A test MCP server on mcp_servers.core whose one tool says who the gateway says is calling.

Run as ``python -m tests.e2e.whoami_server --port P [--assertion-jwks FILE ...]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mcp_servers.core import MCPServer, ToolContext, serve_main

EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}


def build_server(_args: argparse.Namespace | None = None) -> MCPServer:
    server = MCPServer("whoami", version="1.0.0")

    @server.tool(name="whoami", description="The caller this server was told about",
                 input_schema=EMPTY_OBJECT, annotations={"readOnlyHint": True})
    async def whoami(ctx: ToolContext, _args: dict[str, Any]) -> str:
        caller = ctx.caller
        return json.dumps({"sub": caller.sub if caller else None,
                "issuer": caller.issuer if caller else None,
                "tenant": caller.tenant if caller else None,
                "client_id": caller.client_id if caller else None,
                "roles": list(caller.roles) if caller else None,
                "decision_id": ctx.decision_id})

    return server


if __name__ == "__main__":
    serve_main(build_server)
