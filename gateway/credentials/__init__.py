"""Upstream credentials (docs/upstream-credentials.md): what ext_authz presents to one upstream
for the caller in place of the client's own token, which never leaves the gateway.

- :mod:`gateway.credentials.config`: ``servers.<name>.credentials`` parsed and typed.
- :mod:`gateway.credentials.provider`: the headers one allowed request gets, per server.
- :mod:`gateway.credentials.exchange`: the RFC 8693 token exchange client and its cache.
- :mod:`gateway.credentials.store`: the per-user store, encrypted at rest (SQLite).
"""
