"""Run the database MCP server: ``python -m mcp_servers.database [--dsn postgresql://...]``."""

from mcp_servers.core import serve_main
from mcp_servers.database.server import add_arguments, build_server

if __name__ == "__main__":
    serve_main(build_server, add_arguments)
