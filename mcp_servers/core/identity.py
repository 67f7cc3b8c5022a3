"""Who a request acts for, as an MCP server behind the gateway learns it.

With ``assertion_jwks`` set (a file or an ``http(s)`` URL of the gateway's published JWKS), the
caller comes only from the gateway's signed assertion in ``x-mcp-assertion``
(``gateway.assertion``): its signature, issuer, audience (this server's resource id), expiry and
a jti not seen before are checked, and a request without a valid one is refused 401 with the
reason logged. The bare identity headers are then never read. Without it (a server run without
the gateway, or behind a gateway with ``identity.assertion`` off), the identity headers of
``gateway.wire`` name the caller as before.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from gateway.assertion import (
    Assertion,
    AssertionVerifier,
    InvalidAssertion,
    JwksFileKeys,
    KeySource,
)
from gateway.errors import InvalidToken, KeysUnavailable
from gateway.jwks import JwksClient
from gateway.wire import ASSERTION_HEADER, DECISION_ID_HEADER

logger = logging.getLogger(__name__)

ASSERTION_KEY = web.RequestKey("mcp_assertion", Assertion)
# A URL JWKS: refetched on an unknown kid at most once per cooldown, bounded in time and size.
JWKS_COOLDOWN_SECONDS = 5.0
JWKS_TIMEOUT_SECONDS = 2.0
JWKS_MAX_BYTES = 64 * 1024


class UrlKeys:
    """The gateway's JWKS fetched from a URL with the gateway's JWKS client (gateway.jwks: kid
    lookup in the set only, refetch on unknown kid rate-limited, keys not for signatures ignored)."""

    def __init__(self, client: JwksClient) -> None:
        self._client = client

    async def get(self, kid: str) -> Any:
        try:
            return (await self._client.get(kid)).key
        except InvalidToken:
            raise InvalidAssertion("the assertion's kid is not in the gateway's JWKS",
                                   code="unknown_kid") from None
        except KeysUnavailable:
            raise InvalidAssertion("the gateway's JWKS is unavailable", code="keys_unavailable",
                                   http_status=503) from None


class RequestIdentity:
    """The server's caller check; ``verifier`` None: the identity headers (no assertion)."""

    def __init__(self, verifier: AssertionVerifier | None = None) -> None:
        self.verifier = verifier

    @property
    def required(self) -> bool:
        return self.verifier is not None

    async def establish(self, request: web.Request) -> Assertion | None:
        """Verify the request's assertion and keep it on the request (``ASSERTION_KEY``);
        raises InvalidAssertion. Nothing to do without a verifier."""
        if self.verifier is None:
            return None
        assertion = await self.verifier.verify(request.headers.get(ASSERTION_HEADER))
        request[ASSERTION_KEY] = assertion
        return assertion



def add_assertion_arguments(parser: argparse.ArgumentParser,
                            environ: Mapping[str, str] | None = None) -> None:
    """The caller assertion's flags (docs/identity.md), each defaulting to an environment variable."""
    environ = os.environ if environ is None else environ
    parser.add_argument("--assertion-jwks", default=environ.get("MCP_ASSERTION_JWKS") or None,
                        metavar="FILE|URL",
                        help="the gateway's published JWKS: require its signed caller assertion "
                             "(x-mcp-assertion) on every request and ignore the identity headers "
                             "(default $MCP_ASSERTION_JWKS; none: identity headers)")
    parser.add_argument("--assertion-issuer", default=environ.get("MCP_ASSERTION_ISSUER") or None,
                        help="the gateway's issuer (its public URL) (default $MCP_ASSERTION_ISSUER)")
    parser.add_argument("--assertion-audience",
                        default=environ.get("MCP_ASSERTION_AUDIENCE") or None,
                        help="this server's resource id, the assertion's aud "
                             "(default $MCP_ASSERTION_AUDIENCE)")


def file_verifier(path: str, *, issuer: str, audience: str, leeway: int) -> AssertionVerifier:
    return AssertionVerifier(JwksFileKeys(path), issuer=issuer, audience=audience, leeway=leeway)


def identity_context(identity: RequestIdentity, jwks: str, *, issuer: str, audience: str,
                     leeway: int) -> Any:
    """An aiohttp ``cleanup_ctx`` entry installing the verifier for ``jwks`` (a file path or an
    http(s) URL) on ``identity`` for the application's lifetime."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        if not jwks.startswith(("http://", "https://")):
            identity.verifier = file_verifier(jwks, issuer=issuer, audience=audience,
                                              leeway=leeway)
            yield
            return
        async with aiohttp.ClientSession(headers={"accept": "application/json"}) as session:
            client = JwksClient(jwks, session, cooldown=JWKS_COOLDOWN_SECONDS,
                                timeout=JWKS_TIMEOUT_SECONDS, max_bytes=JWKS_MAX_BYTES,
                                issuer=issuer)
            await client.refresh()
            keys: KeySource = UrlKeys(client)
            identity.verifier = AssertionVerifier(keys, issuer=issuer, audience=audience,
                                                  leeway=leeway)
            yield

    return ctx


def refusal_log(request: web.Request, exc: InvalidAssertion) -> None:
    """One warning line per refused assertion, naming the reason (forged, expired, ...)."""
    logger.warning("caller assertion refused (%s): %s", exc.code, exc.message,
                   extra={"reason": exc.code, "status": exc.http_status,
                          "method": request.method, "path": request.path})


def decision_id_of(request: web.Request) -> str | None:
    """The gateway's decision id for this request: from the verified assertion, else the
    identity header (no assertion)."""
    assertion: Assertion | None = request.get(ASSERTION_KEY)
    if assertion is not None:
        return assertion.decision_id
    return request.headers.get(DECISION_ID_HEADER)


def audit_redact_of(request: web.Request) -> Any:
    """The decision's audit_redact obligation from the verified assertion (None without one:
    bare identity headers are not signed, so they never carry it)."""
    assertion: Assertion | None = request.get(ASSERTION_KEY)
    return assertion.audit_redact if assertion is not None else None


def check_tool_claim(request: web.Request, tool: str | None) -> None:
    """A tools/call must call the tool its assertion was issued for (the ``tool`` claim, when it
    has one: ext_authz names the tool it allowed); raises InvalidAssertion ``tool_mismatch``."""
    assertion = request.get(ASSERTION_KEY)
    if assertion is None or assertion.tool is None or assertion.tool == tool:
        return
    exc = InvalidAssertion("the assertion was issued for another tool", code="tool_mismatch")
    refusal_log(request, exc)
    raise exc
