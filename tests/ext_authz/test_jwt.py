"""Token verification against a real JWKS server: the attacks of issue 3 each get a test."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt as pyjwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from ext_authz.errors import InvalidToken
from ext_authz.jwt import TokenVerifier
from gateway.jwks import JwksClient
from gatewayctl.tokens import SigningKey, generate_key
from tests.ext_authz.conftest import ISSUER, JwksServer, make_config, resource, token_for

FILES = resource("files")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(jwks_server: JwksServer, session: aiohttp.ClientSession, clock: Clock) -> TokenVerifier:
    cfg = make_config(jwks_server.url)
    issuer = cfg.issuers[0]
    client = JwksClient(issuer.jwks_url, session, cooldown=30, timeout=2, max_bytes=65536)
    return TokenVerifier({ISSUER: (issuer, client)}, cfg.auth, clock=clock)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}.{b64(signature)}"


def good_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": FILES, "iat": now, "exp": now + 600}
    claims.update(overrides)
    return claims


async def rejected(verifier: TokenVerifier, token: str, aud: str = FILES) -> str:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token, aud)
    assert info.value.http_status == 401
    return info.value.code


async def test_valid_rs256_token_verifies(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """A well-formed RS256 token of the trusted issuer yields its claims."""
    claims = await verifier.verify(token_for(rsa_key), FILES)
    assert claims["sub"] == "alice" and claims["tenant"] == "acme" and claims["roles"] == ["analyst"]


async def test_valid_es256_token_verifies(verifier: TokenVerifier, ec_key: SigningKey) -> None:
    """ES256 tokens verify against the EC key of the JWKS."""
    claims = await verifier.verify(token_for(ec_key), FILES)
    assert claims["iss"] == ISSUER


async def test_alg_none_rejected(verifier: TokenVerifier) -> None:
    """alg=none is refused, with or without a signature part."""
    unsigned = forge({"alg": "none", "kid": "rsa-1"}, good_claims())
    assert await rejected(verifier, unsigned) == "malformed_token"
    assert await rejected(verifier, forge({"alg": "none", "kid": "rsa-1"}, good_claims(), b"x")) \
        == "invalid_algorithm"


async def test_hs256_signed_with_rsa_public_key_rejected(verifier: TokenVerifier,
                                                         rsa_key: SigningKey) -> None:
    """The RS256/HS256 key-confusion attack (HMAC keyed with the public key PEM) is refused."""
    pem = rsa_key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    unsigned = forge(header, good_claims()).rsplit(".", 1)[0]
    sig = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    assert await rejected(verifier, f"{unsigned}.{b64(sig)}") == "invalid_algorithm"


async def test_wrong_issuer_rejected(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """A token from an issuer not in the config is refused before any key lookup."""
    assert await rejected(verifier, token_for(rsa_key, issuer="https://evil.example")) == "invalid_issuer"


async def test_forged_signature_with_trusted_kid_rejected(verifier: TokenVerifier) -> None:
    """A token claiming our issuer and kid but signed by another key fails the signature check."""
    other = generate_key("RSA", kid="rsa-1")
    assert await rejected(verifier, token_for(other)) == "invalid_signature"


async def test_wrong_audience_rejected(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """RFC 8707: a token for another server (or any other audience) is refused."""
    assert await rejected(verifier, token_for(rsa_key, server="database")) == "invalid_audience"
    assert await rejected(verifier, token_for(rsa_key, audience="https://elsewhere")) == "invalid_audience"


async def test_resource_not_served_by_issuer_rejected(verifier: TokenVerifier,
                                                      rsa_key: SigningKey) -> None:
    """A resource outside the issuer's configured audiences is refused even if aud matches."""
    url = "https://gw.example.test/mcp/unknown"
    assert await rejected(verifier, token_for(rsa_key, audience=url), aud=url) == "invalid_audience"


async def test_expired_token_rejected(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """A token past exp (beyond the leeway) is refused."""
    assert await rejected(verifier, token_for(rsa_key, ttl=-120)) == "token_expired"


async def test_expiry_within_leeway_accepted(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """A token that expired less than the leeway ago is still accepted."""
    now = int(time.time())
    token = token_for(rsa_key, extra_claims={"exp": now - 2, "iat": now - 60})
    assert (await verifier.verify(token, FILES))["sub"] == "alice"


async def test_not_yet_valid_token_rejected(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """nbf or iat in the future (beyond the leeway) is refused."""
    future = int(time.time()) + 600
    assert await rejected(verifier, token_for(rsa_key, extra_claims={"nbf": future})) == "token_not_yet_valid"
    assert await rejected(verifier, token_for(rsa_key, extra_claims={"iat": future})) == "token_not_yet_valid"


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud"])
async def test_missing_required_claim_rejected(verifier: TokenVerifier, rsa_key: SigningKey,
                                               claim: str) -> None:
    """exp, iat, sub and aud are required (iss is required to pick the issuer at all)."""
    claims = good_claims()
    del claims[claim]
    token = pyjwt.encode(claims, rsa_key.private_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert await rejected(verifier, token) in ("missing_claim", "invalid_audience")
    if claim != "aud":
        assert await rejected(verifier, token) == "missing_claim"


async def test_missing_iss_rejected(verifier: TokenVerifier, rsa_key: SigningKey) -> None:
    """A token without iss cannot be attributed to a trusted issuer."""
    claims = good_claims()
    del claims["iss"]
    token = pyjwt.encode(claims, rsa_key.private_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert await rejected(verifier, token) == "invalid_issuer"


async def test_oversized_token_rejected_before_decoding(verifier: TokenVerifier,
                                                        jwks_server: JwksServer,
                                                        rsa_key: SigningKey) -> None:
    """Tokens over max_token_bytes are refused without decoding or fetching keys."""
    big = token_for(rsa_key, extra_claims={"pad": "x" * 5000})
    assert await rejected(verifier, big) == "token_too_large"
    assert await rejected(verifier, "A" * 5_000_000) == "token_too_large"
    assert jwks_server.fetches == 0


@pytest.mark.parametrize("name,value", [
    ("jku", "https://evil.example/jwks.json"),
    ("x5u", "https://evil.example/cert.pem"),
    ("jwk", {"kty": "oct", "k": "c2VjcmV0"}),
    ("crit", ["exp"]),
])
async def test_key_pointing_headers_rejected(verifier: TokenVerifier, jwks_server: JwksServer,
                                             rsa_key: SigningKey, name: str, value: Any) -> None:
    """jku / x5u / jwk / crit headers are refused even on a validly signed token; nothing is fetched."""
    token = pyjwt.encode(good_claims(), rsa_key.private_key, algorithm="RS256",
                         headers={"kid": "rsa-1", name: value})
    assert await rejected(verifier, token) == "forbidden_header"
    assert jwks_server.fetches == 0


async def test_use_enc_key_is_not_a_signing_key(verifier: TokenVerifier, jwks_server: JwksServer,
                                                rsa_key: SigningKey) -> None:
    """A token whose kid names a ``use: enc`` key of the JWKS is refused."""
    enc = generate_key("RSA", kid="enc-1")
    jwk = enc.public_jwk() | {"use": "enc"}
    jwks_server.set_keys([rsa_key], extra=[jwk])
    assert await rejected(verifier, token_for(enc)) == "unknown_kid"


async def test_alg_must_match_key_type(verifier: TokenVerifier, ec_key: SigningKey) -> None:
    """A header alg of another family than the kid's key is refused."""
    token = pyjwt.encode(good_claims(), generate_key("RSA").private_key, algorithm="RS256",
                         headers={"kid": ec_key.kid})
    assert await rejected(verifier, token) == "invalid_algorithm"


async def test_garbage_tokens_rejected(verifier: TokenVerifier) -> None:
    """Non-JWS strings and non-JSON parts are refused as malformed."""
    for token in ("abc", "a.b", "a.b.c.d", "!!.??.**", f"{b64(b'[1]')}.{b64(b'{}')}.c2ln"):
        assert await rejected(verifier, token) == "malformed_token"


class CountingVerifier(TokenVerifier):
    """Counts full (uncached) verifications."""

    full = 0

    async def _verify_uncached(self, token: str, resource: str) -> Any:
        self.full += 1
        return await super()._verify_uncached(token, resource)


async def test_verified_token_is_cached_until_exp(jwks_server: JwksServer,
                                                  session: aiohttp.ClientSession,
                                                  rsa_key: SigningKey, clock: Clock) -> None:
    """Repeats hit the cache, other audiences are still refused, and exp + leeway ends the entry."""
    cfg = make_config(jwks_server.url)
    client = JwksClient(jwks_server.url, session, cooldown=30, timeout=2, max_bytes=65536)
    verifier = CountingVerifier({ISSUER: (cfg.issuers[0], client)}, cfg.auth, clock=clock)
    token = token_for(rsa_key, ttl=60)
    await verifier.verify(token, FILES)
    assert (await verifier.verify(token, FILES))["sub"] == "alice"
    assert verifier.full == 1 and verifier.cache_len() == 1
    assert await rejected(verifier, token, aud=resource("database")) == "invalid_audience"
    clock.now += 60 + 5 + 1  # past exp + leeway on the cache's clock
    await verifier.verify(token, FILES)
    assert verifier.full == 2


async def test_cache_is_bounded(jwks_server: JwksServer, session: aiohttp.ClientSession,
                                rsa_key: SigningKey) -> None:
    """The verified-token cache never holds more than token_cache_size entries."""
    cfg = make_config(jwks_server.url, auth={"token_cache_size": 3})
    client = JwksClient(jwks_server.url, session, cooldown=30, timeout=2, max_bytes=65536)
    verifier = TokenVerifier({ISSUER: (cfg.issuers[0], client)}, cfg.auth)
    for i in range(10):
        await verifier.verify(token_for(rsa_key, sub=f"user{i}"), FILES)
    assert verifier.cache_len() == 3
