"""Run the workflow MCP server: ``python -m mcp_servers.workflow --runs-db F --delegation-key K ...``."""

from mcp_servers.core import serve_main
from mcp_servers.workflow.server import add_arguments, build_server

if __name__ == "__main__":
    serve_main(build_server, add_arguments)
