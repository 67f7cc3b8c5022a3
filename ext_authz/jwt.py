"""Bearer token verification with PyJWT.

The issuer is chosen by the token's unverified ``iss`` only to pick its keys and rules; the
signature, ``iss``, ``aud`` (the RFC 8707 resource URL of the server being called), ``exp``,
``nbf`` and ``iat`` are then all verified by PyJWT with algorithms taken from the config, never
from the token. Verified claims are cached under the SHA-256 of the exact token bytes until the
token expires, so a client's repeated requests cost one hash and one dict lookup.

A token of a delegation issuer (``issuers[].delegation``) must name the caller it acts for
(``caller_iss``, an issuer of this list that is not a delegation one) and the actor (``act``);
its claims are returned as that caller's (``gateway.caller.delegated_claims``), else 401
``invalid_delegation``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from ext_authz.errors import InvalidToken
from gateway.caller import delegated_claims
from gateway.config import AuthConfig, IssuerConfig
from gateway.jwks import JwksClient, VerificationKey

REQUIRED_CLAIMS = ("exp", "iat", "sub", "aud", "iss")
# Header parameters that point at keys or change processing rules; a verifier that honoured any
# of them would let the token choose its own key (jku/x5u/jwk/x5c) or semantics (crit/b64).
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: dict[str, Any]
    expires: float  # exp + leeway
    audiences: frozenset[str]  # the token's aud claim intersected with the issuer's audiences


class TokenVerifier:
    """Verify bearer tokens of the configured issuers."""

    def __init__(self, issuers: Mapping[str, tuple[IssuerConfig, JwksClient]], auth: AuthConfig,
                 *, clock: Callable[[], float] = time.time) -> None:
        self._issuers = dict(issuers)
        # The issuers a delegated token's caller_iss may name: never a delegation issuer (no
        # chains of actors).
        self._caller_issuers = frozenset(name for name, (cfg, _) in self._issuers.items()
                                         if not cfg.delegation)
        self._leeway = float(auth.leeway_seconds)
        self._max_bytes = auth.max_token_bytes
        self._cache_size = auth.token_cache_size
        self._cache: dict[bytes, _Verified] = {}
        self._clock = clock

    async def verify(self, token: str, resource: str) -> dict[str, Any]:
        """The verified claims of ``token`` for a request to ``resource``, or raise InvalidToken."""
        if len(token) > self._max_bytes:
            # Before any hashing or decoding: a multi-MB token costs us nothing but this check.
            raise InvalidToken(f"the token exceeds {self._max_bytes} bytes", code="token_too_large")
        token_bytes = token.encode("ascii", "replace")
        digest = hashlib.sha256(token_bytes).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit.expires:
                if resource in hit.audiences:
                    return hit.claims
                raise InvalidToken("the token's audience is not this resource", code="invalid_audience")
            del self._cache[digest]
        verified = await self._verify_uncached(token, resource)
        self._remember(digest, verified, now)
        return verified.claims

    async def _verify_uncached(self, token: str, resource: str) -> _Verified:
        if _COMPACT.fullmatch(token) is None:
            raise InvalidToken("the token is not a compact JWS", code="malformed_token")
        head_b64, body_b64, _ = token.split(".")
        header = _b64_json(head_b64, "header")
        payload = _b64_json(body_b64, "payload")
        forbidden = FORBIDDEN_HEADERS.intersection(header)
        if forbidden:
            raise InvalidToken(f"token header parameter(s) {sorted(forbidden)} are not accepted",
                               code="forbidden_header")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise InvalidToken("the token type (typ) is not a JWT access token", code="invalid_type")
        iss = payload.get("iss")
        entry = self._issuers.get(iss) if isinstance(iss, str) else None
        if entry is None:
            raise InvalidToken("the token's issuer is not trusted", code="invalid_issuer")
        issuer, jwks = entry
        if resource not in issuer.audiences:
            raise InvalidToken("this issuer's tokens are not accepted for this resource",
                               code="invalid_audience")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise InvalidToken(f"the token algorithm {alg!r} is not allowed for this issuer",
                               code="invalid_algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("the token header has no kid", code="unknown_kid")
        key = await jwks.get(kid)
        _check_key_fits(key, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=[alg], audience=resource, issuer=issuer.issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True,
                         "verify_exp": True, "verify_nbf": True, "verify_iat": True,
                         "verify_aud": True, "verify_iss": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet", code="token_not_yet_valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token lacks the {exc.claim!r} claim", code="missing_claim") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("the token's audience is not this resource",
                               code="invalid_audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("the token's issuer is not trusted", code="invalid_issuer") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token signature is invalid", code="invalid_signature") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the token is invalid: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("the token's sub must be a non-empty string", code="missing_claim")
        if issuer.delegation:
            try:
                claims = delegated_claims(claims, trusted_issuers=self._caller_issuers)
            except ValueError as exc:
                raise InvalidToken(f"the delegated token is not acceptable: {exc}",
                                   code="invalid_delegation") from None
        exp = claims["exp"]
        aud = claims["aud"]
        auds = {aud} if isinstance(aud, str) else {a for a in aud if isinstance(a, str)}
        return _Verified(claims, float(exp) + self._leeway,
                         frozenset(auds.intersection(issuer.audiences)))

    def _remember(self, digest: bytes, verified: _Verified, now: float) -> None:
        cache = self._cache
        if len(cache) >= self._cache_size:
            for k in [k for k, v in cache.items() if v.expires <= now]:
                del cache[k]
            while len(cache) >= self._cache_size:
                del cache[next(iter(cache))]  # oldest insertion first
        cache[digest] = verified

    def cache_len(self) -> int:
        return len(self._cache)


def _b64_json(part: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidToken(f"the token {what} is not base64url JSON", code="malformed_token") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"the token {what} is not a JSON object", code="malformed_token")
    return value


def _check_key_fits(key: VerificationKey, alg: str) -> None:
    """The JWKS key must be of the algorithm's family (and curve), and match its own alg."""
    if key.alg is not None and key.alg != alg:
        raise InvalidToken("the token algorithm does not match its key", code="invalid_algorithm")
    family = alg[:2]
    ok = ((family in ("RS", "PS") and key.kty == "RSA")
          or (family == "ES" and key.kty == "EC" and key.crv == _EC_CURVES.get(alg))
          or (alg == "EdDSA" and key.kty == "OKP"))
    if not ok:
        raise InvalidToken("the token algorithm does not match its key", code="invalid_algorithm")
