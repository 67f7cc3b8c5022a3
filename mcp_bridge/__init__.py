"""A Streamable HTTP front for stdio MCP servers: one child per MCP session, a warm pool for
stateless (2026-07-28) clients. See README.md for the session model and limits."""
