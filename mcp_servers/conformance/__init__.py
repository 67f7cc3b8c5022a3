"""The fixtures the official MCP conformance suite (@modelcontextprotocol/conformance) expects."""
