"""The command groups of ``mcp-gateway``: each module exposes ``register(subparsers)`` and sets
``func`` on the commands it adds."""
