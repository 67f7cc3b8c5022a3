"""Shared core of the MCP gateway: strict JSON-RPC/MCP message handling, config, CLI."""

__version__ = "0.1.0"
