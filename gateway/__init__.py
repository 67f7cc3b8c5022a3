"""Shared core of the MCP gateway: strict JSON-RPC/MCP message handling, config, policy,
telemetry. The operator tooling (CLI, dev stack) lives in ``gatewayctl``, which imports this."""

import os

__version__ = "0.1.0"

# The dev stack and the tests start processes (subprocess with a pre-exec hook) from processes
# that also hold gRPC channels and servers. grpcio's fork handlers then run in the child between
# fork and exec, where the restarted poller can find its epoll descriptor closed and abort the
# child before it execs (seen as "Epoll1Poller ... epoll_wait error: Bad file descriptor" in the
# child's log; grpc/grpc issue 43055). Nothing in the gateway forks without exec'ing, so the
# handlers are off unless the environment says otherwise. Effective when this package is imported
# before grpc (the CLI and the tests' root conftest make sure of that); children inherit it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
