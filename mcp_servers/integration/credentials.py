"""The connector's own credentials for its backend: a static API key or OAuth 2 client credentials.

These are the only credentials a backend ever sees; the MCP client's token stops at the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Protocol

import aiohttp

logger = logging.getLogger(__name__)

TOKEN_SKEW = 30.0  # refresh this long before expiry so a token never expires in flight
DEFAULT_TOKEN_LIFETIME = 60.0  # when the token endpoint omits expires_in


class CredentialError(Exception):
    """The connector could not obtain credentials (bad client secret, token endpoint down...)."""


class Credentials(Protocol):
    header_names: frozenset[str]

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]: ...

    def invalidate(self) -> None: ...


class NoCredentials:
    header_names: frozenset[str] = frozenset()

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {}

    def invalidate(self) -> None:
        return None


class ApiKey:
    def __init__(self, value: str, header: str = "X-API-Key") -> None:
        if not value:
            raise ValueError("the API key is empty")
        self._value = value
        self._header = header
        self.header_names = frozenset({header.lower()})

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {self._header: self._value}

    def invalidate(self) -> None:
        return None


class OAuthClientCredentials:
    """RFC 6749 section 4.4 with client_secret_basic; the token is cached until shortly before expiry."""

    header_names = frozenset({"authorization"})

    def __init__(self, token_url: str, client_id: str, client_secret: str, *, scope: str | None = None,
                 audience: str | None = None, timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (token_url and client_id and client_secret):
            raise ValueError("OAuth client credentials need a token URL, a client id and a client secret")
        self.token_url = token_url
        # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
        pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(client_secret)}"
        self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
        self._scope = scope
        self._audience = audience
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    def invalidate(self) -> None:
        self._token = None

    async def headers(self, session: aiohttp.ClientSession) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token(session)}"}

    async def token(self, session: aiohttp.ClientSession) -> str:
        if self._token is not None and self._clock() < self._expires_at:
            return self._token
        async with self._lock:  # one fetch for all callers waiting on an expired token
            if self._token is not None and self._clock() < self._expires_at:
                return self._token
            self._token, lifetime = await self._fetch(session)
            self._expires_at = self._clock() + max(lifetime - TOKEN_SKEW, lifetime / 2)
            return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self._scope:
            form["scope"] = self._scope
        if self._audience:
            form["audience"] = self._audience
        self.fetch_count += 1
        try:
            headers = {"Accept": "application/json", "Authorization": self._basic}
            async with session.post(self.token_url, data=form, timeout=self._timeout,
                                    headers=headers) as resp:
                try:
                    body = await resp.json(content_type=None)
                except ValueError:
                    body = None
                if resp.status != 200 or not isinstance(body, dict):
                    detail = (body.get("error_description") or body.get("error")) if isinstance(body, dict) \
                        else ""
                    raise CredentialError(f"token endpoint answered {resp.status}"
                                          + (f": {detail}" if detail else ""))
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CredentialError(f"token endpoint unreachable: {type(e).__name__}: {e}") from None
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise CredentialError("token endpoint answered without an access_token")
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 \
            else DEFAULT_TOKEN_LIFETIME
        logger.info("fetched an OAuth access token from %s (expires in %.0f s)", self.token_url, lifetime)
        return token, lifetime
