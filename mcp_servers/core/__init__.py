"""A small library for MCP servers on aiohttp (Streamable HTTP, protocol 2025-06-18 .. 2026-07-28).

Public API: :class:`MCPServer` (decorators for tools, resources, prompts, completion),
:class:`ToolContext` (its :class:`Caller`), :class:`ToolResult`, :class:`ToolError`,
:class:`ResourceNotFound`, :class:`ServerSettings` and :func:`serve_main`.
"""

from gateway.caller import Caller
from mcp_servers.core.app import make_app, run_server, serve_main
from mcp_servers.core.context import ToolContext
from mcp_servers.core.errors import ClientRequestFailed, InvalidParams, McpError, ResourceNotFound, ToolError
from mcp_servers.core.registry import ToolResult
from mcp_servers.core.server import MCPServer
from mcp_servers.core.settings import ServerSettings

__all__ = [
    "Caller",
    "ClientRequestFailed",
    "InvalidParams",
    "MCPServer",
    "McpError",
    "ResourceNotFound",
    "ServerSettings",
    "ToolContext",
    "ToolError",
    "ToolResult",
    "make_app",
    "run_server",
    "serve_main",
]
