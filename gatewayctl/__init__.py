"""Operator tooling for the gateway: the ``mcp-gateway`` command line, the local dev stack,
Envoy config rendering and dev tokens.

Everything here builds on the shared core (``gateway``); the core and the services never import
this package (see README.md).
"""

# The core sets GRPC_ENABLE_FORK_SUPPORT on import; it must come before anything loads grpc,
# because the dev stack starts processes while the CLI may hold gRPC channels.
import gateway  # noqa: F401
