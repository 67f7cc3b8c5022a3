"""An MCP server (official Python SDK) that answers with the raw request headers it received:
the upstream of the upstream-credentials tests.

``python -m tests.e2e.credentials_upstream --port P``: Streamable HTTP at /mcp on 127.0.0.1. Its
one tool ``headers`` returns every received header line as ``[name, value]`` pairs, repeats
included, exactly as they arrived, as JSON text.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer


def build() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("credentials-upstream")

    @server.tool(description="The raw request header lines this server received.")
    def headers(ctx: Context) -> str:
        request = ctx.request_context.request
        raw = getattr(getattr(request, "headers", None), "raw", [])
        return json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in raw])

    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = build().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
