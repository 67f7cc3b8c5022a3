"""ext_authz errors: each has a stable ``code`` used in the decision log, the HTTP status of the
answer Envoy sends, and the JSON-RPC error the client reads."""

from __future__ import annotations

from gateway.errors import FORBIDDEN, INTERNAL_ERROR, RATE_LIMITED, UNAUTHORIZED, GatewayError


class AuthError(GatewayError):
    """Authentication failed: answered 401 with a ``WWW-Authenticate: Bearer`` challenge.

    ``challenge_error`` is the RFC 6750 error code of the challenge; ``None`` when the client
    sent no credentials at all (RFC 6750 section 3.1: no error code then).
    """

    code = "invalid_token"
    rpc_code = UNAUTHORIZED
    http_status = 401
    challenge_error: str | None = "invalid_token"


class MissingToken(AuthError):
    code = "missing_token"
    challenge_error = None


class InvalidToken(AuthError):
    """The token is malformed, unsigned by a trusted key, or its claims are not acceptable."""


class TokenInQuery(AuthError):
    """RFC 6750 section 2.3 / MCP: access tokens never travel in the URI (logs, Referer)."""

    code = "token_in_query"
    http_status = 400
    challenge_error = "invalid_request"


class KeysUnavailable(GatewayError):
    """The issuer's JWKS could not be fetched, so no token of it can be verified (fail closed)."""

    code = "jwks_unavailable"
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
