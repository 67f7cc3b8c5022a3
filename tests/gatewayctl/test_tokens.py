"""Dev signing keys and token minting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import pytest
from jwt import PyJWK

from gatewayctl.tokens import generate_key, load_key, load_or_create_key, mint_token, thumbprint


@pytest.mark.parametrize("kind,alg", [("RSA", "RS256"), ("EC", "ES256")])
def test_minted_token_verifies_with_public_jwk(kind: str, alg: str) -> None:
    """A minted token verifies against the key's own JWKS entry and carries the claims."""
    key = generate_key(kind)
    token = mint_token(key, issuer="https://iss", audience="https://gw/mcp/files", sub="alice",
                       roles=["admin"], scopes=["a", "b"], tenant="acme", ttl=60,
                       extra_claims={"client_id": "cli"})
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key.kid and header["alg"] == alg
    jwk = key.jwks()["keys"][0]
    assert jwk["use"] == "sig" and "d" not in jwk
    claims = jwt.decode(token, PyJWK(jwk).key, algorithms=[alg], audience="https://gw/mcp/files",
                        issuer="https://iss")
    assert claims["sub"] == "alice" and claims["roles"] == ["admin"] and claims["scope"] == "a b"
    assert claims["tenant"] == "acme" and claims["client_id"] == "cli"
    assert claims["exp"] - claims["iat"] == 60


def test_negative_ttl_mints_expired_token() -> None:
    """ttl < 0 gives a token that is already expired (iat before exp)."""
    key = generate_key("EC")
    token = mint_token(key, issuer="i", audience="a", sub="s", ttl=-30)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] < time.time() and claims["iat"] < claims["exp"]


def test_kid_is_stable_thumbprint(tmp_path: Path) -> None:
    """The kid is the RFC 7638 thumbprint: a reloaded key has the same kid."""
    path = tmp_path / "keys" / "signing.pem"
    first = load_or_create_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = load_or_create_key(path)
    assert first.kid == again.kid == load_key(path).kid == thumbprint(first.public_jwk())


def test_rfc7638_example_thumbprint() -> None:
    """The thumbprint matches the worked example of RFC 7638 section 3.1."""
    jwk = {"kty": "RSA", "e": "AQAB", "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2Qv"
        "zqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6"
        "WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")}
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_unknown_key_kind_rejected() -> None:
    """Only RSA and EC keys are offered."""
    with pytest.raises(ValueError):
        generate_key("DSA")
