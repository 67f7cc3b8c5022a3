"""Run the files MCP server: ``python -m mcp_servers.files --root DIR [--allow-write]``."""

from mcp_servers.core import serve_main
from mcp_servers.files.server import add_arguments, build_server

if __name__ == "__main__":
    serve_main(build_server, add_arguments)
