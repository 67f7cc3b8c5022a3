"""Why an upstream credential could not be had: each refusal fails the request closed with a
stable code (decision log, metrics label, ``error.data.reason``) and a message telling the caller
what happened or what to do. Never the credential itself, nor the endpoint's answer body."""

from __future__ import annotations

from gateway.errors import FORBIDDEN, INTERNAL_ERROR, GatewayError


class CredentialUnavailable(GatewayError):
    """The credential's source cannot be reached or read now (token endpoint down or slow,
    store unreadable, secret missing): 503, try again."""

    code = "upstream_credential_unavailable"
    rpc_code = INTERNAL_ERROR
    http_status = 503


class TokenExchangeUnavailable(CredentialUnavailable):
    code = "token_exchange_unavailable"


class TokenExchangeRefused(GatewayError):
    """The token endpoint answered with an error (RFC 6749 section 5.2) or an answer that is not
    a usable token: 502, the upstream's credential cannot be obtained for this caller."""

    code = "token_exchange_refused"
    rpc_code = INTERNAL_ERROR
    http_status = 502


class CredentialMissing(GatewayError):
    """The caller has not registered a credential for this server (user store)."""

    code = "upstream_credential_missing"
    rpc_code = FORBIDDEN
    http_status = 403
