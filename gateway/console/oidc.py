"""OpenID Connect sign-in: the authorization code flow with PKCE (S256), against the configured
issuer (console.oidc). The access token it returns is then treated exactly as a pasted one:
verified by ext_authz's verifier with the console's audience (asked for with the RFC 8707
``resource`` parameter) and admitted by the console's Rego decision.

CSRF and mix-up defences: ``state`` is a 256-bit random value, kept server-side with the PKCE
verifier and a nonce for ten minutes at most, used once, and bound to the browser by a
``__Host-`` cookie (SameSite=Lax: the identity provider's redirect back is a cross-site
navigation, on which a Strict cookie is not sent). The token endpoint's answer is bounded in
time and size; the code and tokens are never logged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import orjson

from gateway.config import ConsoleOidcConfig

STATE_COOKIE = "__Host-mcp-console-oidc"
PENDING_SECONDS = 600
MAX_PENDING = 10_000
MAX_TOKEN_RESPONSE_BYTES = 64 * 1024
TOKEN_TIMEOUT_SECONDS = 10.0
MAX_PARAM_CHARS = 2048


class OidcError(Exception):
    """A sign-in that cannot complete; ``code`` is stable and shown to the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Pending:
    verifier: str
    nonce: str
    created: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return _b64(hashlib.sha256(verifier.encode("ascii")).digest())


class OidcClient:
    def __init__(self, cfg: ConsoleOidcConfig, *, redirect_uri: str, resource: str,
                 http: aiohttp.ClientSession, client_secret: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.redirect_uri = redirect_uri
        self.resource = resource
        self._http = http
        self._secret = client_secret
        self._clock = clock
        self._pending: dict[str, Pending] = {}

    def start(self) -> tuple[str, str]:
        """(state, the authorization URL to send the browser to)."""
        now = self._clock()
        if len(self._pending) >= MAX_PENDING:
            for key in [k for k, p in self._pending.items() if now - p.created > PENDING_SECONDS]:
                del self._pending[key]
            while len(self._pending) >= MAX_PENDING:
                del self._pending[next(iter(self._pending))]  # the oldest (insertion order)
        state = secrets.token_urlsafe(32)
        pending = Pending(secrets.token_urlsafe(48), secrets.token_urlsafe(24), now)
        self._pending[state] = pending
        query = urlencode({
            "response_type": "code", "client_id": self.cfg.client_id, "redirect_uri": self.redirect_uri,
            "scope": self.cfg.scope, "state": state, "nonce": pending.nonce,
            "code_challenge": challenge(pending.verifier), "code_challenge_method": "S256",
            "resource": self.resource})
        sep = "&" if "?" in self.cfg.authorization_endpoint else "?"
        return state, f"{self.cfg.authorization_endpoint}{sep}{query}"

    def take(self, state: str | None, cookie: str | None) -> Pending:
        """The pending sign-in ``state`` names, once, if this browser started it in time."""
        if not state or not cookie or len(state) > MAX_PARAM_CHARS or \
                not hmac.compare_digest(state.encode(), cookie.encode()):
            raise OidcError("state_mismatch", "this sign-in was not started by this browser")
        pending = self._pending.pop(state, None)
        if pending is None or self._clock() - pending.created > PENDING_SECONDS:
            raise OidcError("state_expired", "this sign-in expired or was already used: start again")
        return pending

    async def exchange(self, code: str, pending: Pending) -> str:
        """The access token for ``code`` (with the PKCE verifier) from the token endpoint."""
        if not code or len(code) > MAX_PARAM_CHARS:
            raise OidcError("invalid_code", "the identity provider sent no usable code")
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "client_id": self.cfg.client_id, "code_verifier": pending.verifier,
                "resource": self.resource}
        auth = aiohttp.BasicAuth(self.cfg.client_id, self._secret) if self._secret else None
        try:
            async with self._http.post(self.cfg.token_endpoint, data=form, auth=auth,
                                       headers={"accept": "application/json"},
                                       timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT_SECONDS),
                                       allow_redirects=False) as resp:
                body = await resp.content.read(MAX_TOKEN_RESPONSE_BYTES + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcError("token_endpoint_unavailable", f"the token endpoint failed: {exc}") from None
        if len(body) > MAX_TOKEN_RESPONSE_BYTES:
            raise OidcError("token_response_too_large", "the token endpoint's answer is too large")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if status != 200 or not isinstance(doc, dict):
            error = doc.get("error") if isinstance(doc, dict) else None
            raise OidcError("token_exchange_failed",
                            f"the token endpoint refused the code ({status}"
                            f"{': ' + error[:100] if isinstance(error, str) else ''})")
        token = doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise OidcError("token_exchange_failed", "the token endpoint's answer has no access_token")
        return token
