"""ext_authz errors: each has a stable ``code`` used in the decision log, the HTTP status of the
answer Envoy sends, and the JSON-RPC error the client reads."""

from __future__ import annotations

from gateway.errors import (
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    RATE_LIMITED,
    GatewayError,
)

# Defined in gateway.errors (gateway.jwks raises them too); the same classes under these names.
from gateway.errors import AuthError as AuthError
from gateway.errors import InvalidToken as InvalidToken
from gateway.errors import KeysUnavailable as KeysUnavailable


class MissingToken(AuthError):
    code = "missing_token"
    challenge_error = None


class TokenInQuery(AuthError):
    """RFC 6750 section 2.3 / MCP: access tokens never travel in the URI (logs, Referer)."""

    code = "token_in_query"
    http_status = 400
    challenge_error = "invalid_request"


class SqlParserBusy(GatewayError):
    """Every SQL parse place is taken (the parse is pure Python, one at a time, with a short
    queue): refused at once rather than queued without bound."""

    code = "sql_parser_busy"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class UnknownServer(GatewayError):
    code = "unknown_server"
    rpc_code = INTERNAL_ERROR
    http_status = 404


class PolicyDenied(GatewayError):
    code = "policy_denied"
    rpc_code = FORBIDDEN
    http_status = 403


class RateLimited(GatewayError):
    code = "rate_limited"
    rpc_code = RATE_LIMITED
    http_status = 429

    def __init__(self, message: str, *, retry_after: int, scope: str) -> None:
        super().__init__(message, data={"retry_after": retry_after, "limit": scope})
        self.retry_after = retry_after
        self.scope = scope


class RateLimitUnavailable(GatewayError):
    """The shared rate-limit store is unreachable: requests are refused rather than unlimited."""

    code = "rate_limit_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class CatalogNotLoaded(GatewayError):
    """The server's tool catalog has not been fetched yet: no tool of it is callable (fail closed)."""

    code = "catalog_not_loaded"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class CatalogUnavailable(GatewayError):
    """The catalog database cannot be read: calls are refused rather than unchecked."""

    code = "catalog_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class ToolUnknown(GatewayError):
    """The tool is not in the server's catalog. -32602 is MCP's code for an unknown tool."""

    code = "tool_unknown"
    rpc_code = INVALID_PARAMS
    http_status = 403


class ToolQuarantined(GatewayError):
    """The tool's definition changed since it was approved; an operator must approve it again."""

    code = "tool_quarantined"
    rpc_code = FORBIDDEN
    http_status = 403


class ToolNotApproved(ToolQuarantined):
    """``catalog.mode: require_approval`` and nobody approved the tool yet."""

    code = "tool_not_approved"
