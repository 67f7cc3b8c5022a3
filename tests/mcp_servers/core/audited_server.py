"""A tiny MCP server run as a subprocess by the observability tests.

``python -m tests.mcp_servers.core.audited_server --port 0 [--audit-file PATH] [--otlp-endpoint E]``;
its "listening" log line on stderr carries the port.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mcp_servers.core import MCPServer, ToolContext, serve_main

logger = logging.getLogger(__name__)


def build_server(_args: argparse.Namespace) -> MCPServer:
    server = MCPServer("audited", version="0.0.1")

    @server.tool(name="echo", description="Echo text",
                 input_schema={"type": "object", "properties": {"text": {"type": "string"}},
                               "required": ["text"]})
    async def echo(_ctx: ToolContext, args: dict[str, Any]) -> str:
        logger.info("echo called")
        return str(args["text"])

    return server


if __name__ == "__main__":
    serve_main(build_server)
