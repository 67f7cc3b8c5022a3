"""Errors a server author raises, and the JSON-RPC errors the core answers with.

Errors from the dispatcher travel inside an HTTP 200 answer: the transport delivered the message,
the method failed. Transport errors (bad body, unknown session, bad headers) use ``http_status``.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    RESOURCE_NOT_FOUND,
    SESSION_NOT_FOUND,
    GatewayError,
)

# The LSP code for a cancelled request; MCP has none and this one is what SDKs already expect.
REQUEST_CANCELLED = -32800
UNSUPPORTED_PROTOCOL_VERSION = -32000
FORBIDDEN_ORIGIN = -32000


class ToolError(Exception):
    """Raised by a tool handler: becomes an ``isError`` result the model can read and act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class McpError(GatewayError):
    """A JSON-RPC error answer to a well-formed request (HTTP 200)."""

    http_status = 200


class MethodNotFound(McpError):
    code = "method_not_found"
    rpc_code = METHOD_NOT_FOUND


class InvalidParams(McpError):
    code = "invalid_params"
    rpc_code = INVALID_PARAMS


class ResourceNotFound(McpError):
    """Raised by a resource handler for a URI it does not serve."""

    code = "resource_not_found"
    rpc_code = RESOURCE_NOT_FOUND

    def __init__(self, uri: str, message: str | None = None) -> None:
        super().__init__(message or f"resource not found: {uri}", data={"uri": uri})
        self.uri = uri


class RequestCancelled(McpError):
    code = "request_cancelled"
    rpc_code = REQUEST_CANCELLED


class ClientRequestFailed(ToolError):
    """A server-to-client request (sampling, elicitation) failed, was refused or timed out."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error


class SessionNotFound(GatewayError):
    code = "session_not_found"
    rpc_code = SESSION_NOT_FOUND
    http_status = 404


class BadTransportRequest(GatewayError):
    """A request the transport refuses (HTTP 4xx) before any method runs."""

    code = "bad_request"
    rpc_code = INVALID_REQUEST
    http_status = 400
