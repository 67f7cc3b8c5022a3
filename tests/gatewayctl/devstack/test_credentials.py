"""The dev stack's certificates and signing key: made once under state_dir, and the tokens it
mints verify against the JWKS it serves."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography import x509

from gateway.config import load_config, parse_config
from gatewayctl import devstack
from tests.e2e.helpers import stack_config


def test_dev_certificates(config_file: Path) -> None:
    """The dev CA signs a server certificate for the loopback names; keys are private; reused."""
    config = load_config(config_file)
    ca_file = devstack.ensure_tls(config)
    assert ca_file is not None
    cert = x509.load_pem_x509_certificate(Path(config.tls.cert_file).read_bytes())
    ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert Path(config.tls.key_file).stat().st_mode & 0o077 == 0
    before = Path(config.tls.cert_file).read_bytes()
    assert devstack.ensure_tls(config) == ca_file
    assert Path(config.tls.cert_file).read_bytes() == before
    # A TLS client trusting only the dev CA accepts the chain for 127.0.0.1.
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.load_verify_locations(cadata=before.decode())


def test_missing_user_certificate_is_an_error(tmp_path: Path) -> None:
    """A certificate path outside state_dir that does not exist is reported, never invented."""
    raw = yaml.safe_load(stack_config(tmp_path).read_text())
    raw["tls"]["cert_file"] = str(tmp_path / "elsewhere" / "cert.pem")
    config = parse_config(raw, base_dir=tmp_path)
    with pytest.raises(devstack.StackError, match="does not exist"):
        devstack.ensure_tls(config)


def test_tokens_match_the_served_jwks(config_file: Path) -> None:
    """`mint` signs with the dev key whose JWKS the stack serves; audience and scopes per server."""
    config = load_config(config_file)
    token = devstack.mint(config, sub="alice", roles=("analyst",), tenant="acme", ttl=60, server="files")
    jwks = json.loads((devstack.paths(config).jwks_root / "jwks.json").read_text())
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=[key.algorithm_name],
                        audience=config.resource_url("files"), issuer=config.issuers[0].issuer)
    assert claims["sub"] == "alice" and claims["roles"] == ["analyst"] and claims["tenant"] == "acme"
    assert claims["scope"] == "tools:call:files/*"
    expired = devstack.mint(config, sub="bob", ttl=-30)
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, key.key, algorithms=[key.algorithm_name], audience=config.resource_url("files"))
