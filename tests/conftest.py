"""Loaded before any test module: ``gateway`` sets GRPC_ENABLE_FORK_SUPPORT before anything
imports grpc (see gateway/__init__.py), since tests start subprocesses while holding channels."""

import gateway  # noqa: F401
