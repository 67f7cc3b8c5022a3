"""The aggregator's errors: a stable code (metric label and log ``reason``), a JSON-RPC code and
an HTTP status, on the gateway's error tree (``gateway.errors``)."""

from __future__ import annotations

from gateway.errors import INTERNAL_ERROR, INVALID_PARAMS, SESSION_NOT_FOUND, GatewayError

# Why a leg left its server out of an answer: the ``reason`` label of the unavailable counter and
# the ``reason`` named in ``_meta["io.mcp-gateway/unavailable"]``.
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
HTTP_ERROR = "http_error"
BAD_ANSWER = "bad_answer"
SESSION_LOST = "session_lost"
RPC_ERROR = "rpc_error"
REASONS = (UNREACHABLE, TIMEOUT, HTTP_ERROR, BAD_ANSWER, SESSION_LOST, RPC_ERROR)


class AggregatorError(GatewayError):
    """Base of the aggregator's own errors."""

    code = "aggregator_error"
    rpc_code = INTERNAL_ERROR
    http_status = 500


class UpstreamFailed(AggregatorError):
    """One leg got no usable answer; ``reason`` is one of :data:`REASONS`."""

    code = "upstream_unavailable"
    http_status = 503

    def __init__(self, server: str, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"server {server} is unavailable ({detail})",
                         data={"server": server, "cause": reason})
        self.server = server
        self.reason = reason
        self.status = status


class UpstreamDenied(AggregatorError):
    """The per-server route refused the leg (401/403): the caller may not use that server, which
    is left out of the answer without being reported as unavailable."""

    code = "upstream_denied"
    http_status = 403

    def __init__(self, server: str, status: int) -> None:
        super().__init__(f"server {server} refused the caller (HTTP {status})", data={"server": server})
        self.server = server


class SessionGone(AggregatorError):
    """An altered, foreign, ended or unknown aggregate session id: all answered alike."""

    code = "session_not_found"
    rpc_code = SESSION_NOT_FOUND
    http_status = 404


class InvalidCursor(AggregatorError):
    """A list cursor the aggregator did not seal for this list, view and caller."""

    code = "invalid_params"
    rpc_code = INVALID_PARAMS
    http_status = 200
