"""The ext_authz test fixtures (real JWKS server, signing keys, configs) for the wiring tests."""

from tests.ext_authz.conftest import (  # noqa: F401  # fixtures, registered by import
    _isolated_state,
    ec_key,
    jwks_server,
    rsa_key,
    session,
)
