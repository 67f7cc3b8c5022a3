"""JWKS fetching and caching (aiohttp), one :class:`JwksClient` per JWKS URL: ext_authz's per
trusted issuer, and a server's for the gateway's published keys (mcp_servers.core.identity).

Keys are looked up by ``kid`` in the fetched set only (never from ``jku``/``x5u``/``jwk`` token
headers). An unknown ``kid`` triggers a refetch, but at most one per cooldown however many
requests carry unknown kids, so a flood of forged tokens cannot turn us into a load generator
against the identity provider. Keys not meant for signatures (``use`` other than ``sig``,
``key_ops`` without ``verify``), symmetric keys and private keys are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from gateway.errors import InvalidToken, KeysUnavailable
from gateway.telemetry import metrics

logger = logging.getLogger(__name__)

# After a failed fetch, retry sooner than the normal cooldown: an identity provider that was
# briefly down should not lock everyone out for the whole cooldown.
FAILURE_COOLDOWN_SECONDS = 2.0
# Keys removed from the JWKS (revoked) stop being trusted at most this long after removal.
KEYS_MAX_AGE_SECONDS = 900.0


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    kty: str
    crv: str | None
    alg: str | None  # the key's own "alg", when the JWKS pins one
    key: Any  # a cryptography public key object


class JwksClient:
    """The signing keys of one issuer, fetched from its JWKS URL and cached by ``kid``."""

    def __init__(self, url: str, session: aiohttp.ClientSession, *, cooldown: float,
                 timeout: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic, issuer: str | None = None) -> None:
        self.url = url
        self.issuer = issuer or url  # the metrics label
        self._session = session
        self._cooldown = cooldown
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._lock = asyncio.Lock()
        self._last_attempt: float | None = None
        self._last_success: float | None = None
        self._last_failed = False
        self.fetch_count = 0

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    async def get(self, kid: str) -> VerificationKey:
        """The key named ``kid``; refetches the JWKS (rate-limited) when it is unknown."""
        key = self._keys.get(kid)
        if key is not None and not self._stale():
            return key
        async with self._lock:
            key = self._keys.get(kid)
            if key is not None and not self._stale():
                return key
            if self._may_fetch():
                try:
                    await self._fetch()
                except KeysUnavailable:
                    if key is None:
                        raise
                    return key  # stale, but the IdP is down: the last good set still holds
                key = self._keys.get(kid)
            elif key is None and self._last_failed and not self._keys:
                raise KeysUnavailable(f"the signing keys of {self.url} are unavailable")
        if key is None:
            raise InvalidToken("the token's signing key (kid) is not in the issuer's JWKS",
                               code="unknown_kid")
        return key

    async def refresh(self) -> None:
        """Fetch now (start-up warm-up); failures are logged, not raised."""
        async with self._lock:
            try:
                await self._fetch()
            except KeysUnavailable:
                pass

    def _stale(self) -> bool:
        return (self._last_success is not None
                and self._clock() - self._last_success > KEYS_MAX_AGE_SECONDS)

    def _may_fetch(self) -> bool:
        if self._last_attempt is None:
            return True
        wait = min(self._cooldown, FAILURE_COOLDOWN_SECONDS) if self._last_failed else self._cooldown
        return self._clock() - self._last_attempt >= wait

    async def _fetch(self) -> None:
        self._last_attempt = self._clock()
        self.fetch_count += 1
        outcome = "unreachable"
        try:
            async with self._session.get(self.url, timeout=self._timeout,
                                         allow_redirects=False) as resp:
                if resp.status != 200:
                    outcome = "http_error"
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(self._max_bytes + 1)
            outcome = "invalid"
            if len(body) > self._max_bytes:
                raise ValueError(f"JWKS larger than {self._max_bytes} bytes")
            keys = parse_jwks(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # orjson.JSONDecodeError is a ValueError.
            if isinstance(exc, TimeoutError):
                outcome = "timeout"
            metrics.JWKS_FETCHES.labels(self.issuer, outcome).inc()
            self._last_failed = True
            logger.warning("JWKS fetch from %s failed: %s", self.url, exc)
            raise KeysUnavailable(f"the signing keys of {self.url} are unavailable") from None
        metrics.JWKS_FETCHES.labels(self.issuer, "ok").inc()
        self._last_failed = False
        self._last_success = self._last_attempt
        added = set(keys) - set(self._keys)
        removed = set(self._keys) - set(keys)
        self._keys = keys
        logger.info("JWKS from %s: %d key(s), added %s, removed %s", self.url, len(keys),
                    sorted(added), sorted(removed))


def parse_jwks(doc: Any) -> dict[str, VerificationKey]:
    """The usable signature-verification keys of a JWKS document, by ``kid``."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    out: dict[str, VerificationKey] = {}
    duplicates: set[str] = set()
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            logger.warning("JWKS key without kid ignored")
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        kty = jwk.get("kty")
        if kty not in ("RSA", "EC", "OKP"):
            continue  # "oct" would be an HMAC secret: never a public verification key
        if "d" in jwk:
            logger.warning("JWKS key %s contains private material; ignored", kid)
            continue
        if kid in out or kid in duplicates:
            duplicates.add(kid)
            continue
        alg = jwk.get("alg")
        try:
            loaded = PyJWK(jwk)
        except PyJWKError as exc:
            logger.warning("JWKS key %s ignored: %s", kid, exc)
            continue
        crv = jwk.get("crv")
        out[kid] = VerificationKey(kid, kty, crv if isinstance(crv, str) else None,
                                   alg if isinstance(alg, str) else None, loaded.key)
    for kid in duplicates:
        # Two keys under one kid: which one signs is ambiguous, so neither is trusted.
        logger.warning("JWKS kid %s appears more than once; ignored", kid)
        out.pop(kid, None)
    return out
