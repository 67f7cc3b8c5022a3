"""The bridge's errors: a stable code (metric label and log ``reason``), a JSON-RPC code and an
HTTP status, on the gateway's error tree (``gateway.errors``)."""

from __future__ import annotations

from gateway.errors import INTERNAL_ERROR, SESSION_NOT_FOUND, GatewayError


class BridgeError(GatewayError):
    """Base of the bridge's own errors."""

    code = "bridge_error"
    rpc_code = INTERNAL_ERROR
    http_status = 500


class UpstreamExited(BridgeError):
    """The child exited (or closed stdout) while the request was in flight."""

    code = "upstream_exited"
    http_status = 502


class UpstreamUnavailable(BridgeError):
    """No child is up to take the request (starting, restarting or crash-looping)."""

    code = "upstream_unavailable"
    http_status = 503


class UpstreamProtocolError(BridgeError):
    """The child broke the stdio framing (a line over the limit) or failed its handshake."""

    code = "upstream_protocol_error"
    http_status = 502


class BridgeBusy(BridgeError):
    """A queue or in-flight bound is full; the client should retry later."""

    code = "bridge_busy"
    http_status = 503


class SessionLimit(BridgeError):
    """Every session slot holds a child; a new initialize waits for one to end."""

    code = "session_limit"
    http_status = 503


class SessionGone(BridgeError):
    """Unknown, ended or foreign session id: the client must initialize again."""

    code = "session_not_found"
    rpc_code = SESSION_NOT_FOUND
    http_status = 404


class NotSupported(BridgeError):
    """A message the bridge cannot carry in this mode (documented in README.md)."""

    code = "not_supported"
    rpc_code = -32601
    http_status = 200
