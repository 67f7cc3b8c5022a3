"""The JWKS client lives in :mod:`gateway.jwks` (servers verify with it too and must not depend
on ext_authz); these names stay importable from here for ext_authz's modules."""

from __future__ import annotations

from gateway.jwks import (
    FAILURE_COOLDOWN_SECONDS,
    KEYS_MAX_AGE_SECONDS,
    JwksClient,
    VerificationKey,
    parse_jwks,
)

__all__ = ["FAILURE_COOLDOWN_SECONDS", "KEYS_MAX_AGE_SECONDS", "JwksClient", "VerificationKey",
           "parse_jwks"]
