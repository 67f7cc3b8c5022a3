"""Integration layer: an OpenAPI 3 backend's allow-listed operations exposed as MCP tools."""
