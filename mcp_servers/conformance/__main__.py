"""``python -m mcp_servers.conformance --port N`` (or ``--stdio``): the conformance fixture server."""

from mcp_servers.conformance.server import build_server
from mcp_servers.core import serve_main

if __name__ == "__main__":
    serve_main(build_server)
