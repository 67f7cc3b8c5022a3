"""One error tree for the whole gateway.

Every error carries a stable ``code`` (a short snake_case string reused as a metric label and in
decision logs), the JSON-RPC error code sent to the client, and the HTTP status of the answer.
"""

from __future__ import annotations

from typing import Any

# JSON-RPC 2.0 codes, plus the MCP ones the gateway uses.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020  # MCP 2026-07-28 (SEP-2243): Mcp-Method / Mcp-Name disagree with body
RESOURCE_NOT_FOUND = -32002
# Gateway-defined codes live in the implementation-defined server error range.
UNAUTHORIZED = -32001
FORBIDDEN = -32003
RATE_LIMITED = -32029
SESSION_NOT_FOUND = -32004


class GatewayError(Exception):
    """An error that maps deliberately onto HTTP status + JSON-RPC error."""

    code: str = "internal_error"
    rpc_code: int = INTERNAL_ERROR
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, rpc_code: int | None = None,
                 http_status: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if rpc_code is not None:
            self.rpc_code = rpc_code
        if http_status is not None:
            self.http_status = http_status
        self.data = data

    def to_rpc_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.rpc_code, "message": self.message}
        data = {"reason": self.code}
        if isinstance(self.data, dict):
            data.update(self.data)
        err["data"] = data
        return err


class ParseError(GatewayError):
    code = "parse_error"
    rpc_code = PARSE_ERROR
    http_status = 400


class PayloadTooLarge(ParseError):
    code = "payload_too_large"
    http_status = 413


class InvalidRequest(GatewayError):
    code = "invalid_request"
    rpc_code = INVALID_REQUEST
    http_status = 400


class HeaderMismatch(GatewayError):
    code = "header_mismatch"
    rpc_code = HEADER_MISMATCH
    http_status = 400


class UnsupportedEncoding(GatewayError):
    """A compressed request body: what the gateway inspects must be what the server reads."""

    code = "unsupported_content_encoding"
    rpc_code = INVALID_REQUEST
    http_status = 415


class InputLimitExceeded(GatewayError):
    """An argument the policy reasons about is over one of the gateway's bounds (path length or
    depth, SQL length, table references, ...): refused before any fact is built from it, so the
    work per request is bounded whatever the input. ``data.limit`` names the bound."""

    code = "input_limit_exceeded"
    rpc_code = INVALID_PARAMS
    http_status = 400


# Token verification errors, shared by ext_authz (a client's token) and any verifier that uses
# gateway.jwks (a server checking a JWKS by URL): ext_authz.errors re-exports them.
class AuthError(GatewayError):
    """Authentication failed: answered 401 with a ``WWW-Authenticate: Bearer`` challenge.

    ``challenge_error`` is the RFC 6750 error code of the challenge; ``None`` when the client
    sent no credentials at all (RFC 6750 section 3.1: no error code then).
    """

    code = "invalid_token"
    rpc_code = UNAUTHORIZED
    http_status = 401
    challenge_error: str | None = "invalid_token"


class InvalidToken(AuthError):
    """The token is malformed, unsigned by a trusted key, or its claims are not acceptable."""


class KeysUnavailable(GatewayError):
    """The issuer's JWKS could not be fetched, so no token of it can be verified (fail closed)."""

    code = "jwks_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503
