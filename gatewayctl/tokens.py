"""Development signing keys and token minting.

Used by the CLI ``token`` command, the dev stack's JWKS server and the tests. A key is an RSA or
EC (P-256) private key kept as PEM; its ``kid`` is the RFC 7638 thumbprint of the public key so
that the same file always yields the same kid.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    private_key: PrivateKey
    kid: str
    alg: str  # "RS256" or "ES256"

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK with kid, alg and ``use: sig``."""
        jwk = _public_jwk(self.private_key)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk()]}

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())


def _public_jwk(key: PrivateKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        return RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return ECAlgorithm.to_jwk(key.public_key(), as_dict=True)


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a public RSA or EC key."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = orjson.dumps({m: jwk[m] for m in members}, option=orjson.OPT_SORT_KEYS)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def _signing_key(private_key: PrivateKey, kid: str | None = None) -> SigningKey:
    alg = "RS256" if isinstance(private_key, rsa.RSAPrivateKey) else "ES256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name != "secp256r1":
        raise ValueError("only P-256 EC keys are supported (ES256)")
    return SigningKey(private_key, kid or thumbprint(_public_jwk(private_key)), alg)


def generate_key(kind: str = "RSA", *, kid: str | None = None) -> SigningKey:
    """A new RSA-2048 (RS256) or P-256 (ES256) signing key."""
    if kind == "RSA":
        private: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "EC":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"key kind must be RSA or EC, got {kind!r}")
    return _signing_key(private, kid)


def load_key(path: str | os.PathLike[str], *, kid: str | None = None) -> SigningKey:
    """Load an unencrypted PEM private key (RSA or EC P-256)."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise ValueError(f"{path}: only RSA and EC private keys are supported")
    return _signing_key(key, kid)


def load_or_create_key(path: str | os.PathLike[str], kind: str = "RSA") -> SigningKey:
    """Load the key at ``path``, creating it (mode 0600) on first use."""
    p = Path(path)
    if p.exists():
        return load_key(p)
    key = generate_key(kind)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_pem())
    return key


def mint_token(key: SigningKey, *, issuer: str, audience: str | Iterable[str], sub: str,
               roles: Iterable[str] = (), scopes: Iterable[str] = (), tenant: str | None = None,
               ttl: int = 3600, kid: str | None = None,
               extra_claims: Mapping[str, Any] | None = None, now: float | None = None) -> str:
    """A signed access token. A negative ``ttl`` mints a token that has already expired."""
    issued = int(time.time() if now is None else now)
    exp = issued + ttl
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": audience if isinstance(audience, str) else list(audience),
        # An expired test token was still issued before it expired.
        "iat": issued if ttl > 0 else exp - 60,
        "exp": exp,
        "jti": uuid.uuid4().hex,
        "scope": " ".join(scopes),
        "roles": list(roles),
    }
    if tenant is not None:
        claims["tenant"] = tenant
    if extra_claims:
        claims.update(extra_claims)
    headers = {"kid": kid or key.kid, "typ": "at+jwt"}
    return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)
