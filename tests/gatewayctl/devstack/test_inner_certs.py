"""The dev stack's inner certificates (inner_tls): one per component from the dev CA, with the
DNS name its peer checks, client use only where the component is a client, rotated in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import inner_tls
from gateway.config import GatewayConfig, parse_config
from gatewayctl import devstack
from gatewayctl.devstack.credentials import issue_inner_tls
from gatewayctl.devstack.plan import plan
from tests.e2e.helpers import stack_config
from tests.ports import free_ports

SERVERS: dict[str, dict[str, Any]] = {"files": {"module": "tests.e2e.standin_upstream"},
           "tools": {"command": ["true"]},
           "remote": {"url": "https://mcp.example.test:8443/mcp"}}


def _config(tmp_path: Path, **section: Any) -> GatewayConfig:
    raw = yaml.safe_load(stack_config(tmp_path, servers=SERVERS).read_text())
    raw["inner_tls"] = {"enabled": True, **section}
    agg, inner = free_ports(2)
    raw["aggregate"] = {"instances": [{"port": agg}], "inner_listener": {"port": inner},
                        "session_keys": "AGG_KEYS"}
    raw["secrets"] = [*raw.get("secrets", []), "AGG_KEYS"]
    return parse_config(raw, base_dir=tmp_path)


def _cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_each_inner_component_gets_its_certificate(tmp_path: Path) -> None:
    """Envoy, ext_authz, ext_proc, the aggregator and each module/command server get a
    certificate from the dev CA naming <identity>.<domain> and loopback; url servers get none;
    only Envoy, the aggregator and ext_authz (its catalog fetch) may act as clients; keys are
    private."""
    config = _config(tmp_path)
    issued = issue_inner_tls(config)
    assert set(issued) == {"envoy", "ext-authz", "ext-proc", "aggregator", "server-files", "server-tools"}
    it = config.inner_tls
    ca = _cert(it.ca_file)
    assert Path(it.ca_file).read_bytes() == devstack.paths(config).ca_cert.read_bytes()
    for identity in issued:
        files = it.files(identity)
        cert = _cert(files.cert_file)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName)[0] == f"{identity}.mcp-gateway.internal"
        assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        client = ExtendedKeyUsageOID.CLIENT_AUTH in _usages(cert)
        assert client == (identity in ("envoy", "aggregator", "ext-authz"))
        assert ExtendedKeyUsageOID.SERVER_AUTH in _usages(cert)
        assert Path(files.key_file).stat().st_mode & 0o077 == 0
        # The pair loads as the service will load it.
        inner_tls.server_context(files)
    assert not Path(it.files("server-remote").cert_file).exists()


def test_issue_is_idempotent_and_rotation_replaces_every_pair(tmp_path: Path) -> None:
    """A second start keeps the files; a rotation issues new keys and certificates for every
    component from the same CA."""
    config = _config(tmp_path, domain="gw.internal")
    first = issue_inner_tls(config)
    before = {i: Path(config.inner_tls.files(i).cert_file).read_bytes() for i in first}
    assert issue_inner_tls(config) == []
    assert issue_inner_tls(config, only_missing=False) == first
    for identity, old in before.items():
        files = config.inner_tls.files(identity)
        new = _cert(files.cert_file)
        assert Path(files.cert_file).read_bytes() != old
        new.verify_directly_issued_by(_cert(config.inner_tls.ca_file))
        assert new.subject.rfc4514_string() == f"CN={identity}.gw.internal"
        inner_tls.server_context(files)


def test_operator_files_are_never_invented(tmp_path: Path) -> None:
    """An inner TLS path outside state_dir that does not exist is an error naming the file."""
    config = _config(tmp_path, dir=str(tmp_path / "pki"))
    with pytest.raises(devstack.StackError, match="pki/ext-authz|pki/envoy|inner TLS file"):
        issue_inner_tls(config)


def test_plan_hands_each_process_its_files_and_probes_over_tls(tmp_path: Path) -> None:
    """Under inner_tls each of our processes gets its three MCP_INNER_TLS_* variables, a probe
    that speaks TLS to its name and an https same-port /metrics; the aggregator calls the inner
    listener over https. Off: none of that."""
    config = _config(tmp_path)
    components = {c.name: c for c in plan(config, ext_proc=True)}
    for name, identity in (("ext_authz", "ext-authz"), ("ext_proc", "ext-proc"),
                           ("aggregator", "aggregator"), ("files", "server-files"),
                           ("tools", "server-tools")):
        comp = components[name]
        assert dict(comp.tls_env) == config.inner_tls.files(identity).env(), name
        assert comp.probe.tls_name == f"{identity}.mcp-gateway.internal", name
    assert components["files"].metrics_url is not None
    assert components["files"].metrics_url.startswith("https://")
    argv = components["aggregator"].argv
    assert argv[argv.index("--upstream-base") + 1].startswith("https://127.0.0.1:")
    for name in ("envoy", "jwks", "remote"):
        assert components[name].tls_env == () and components[name].probe.tls_name == "", name
    off = parse_config({**yaml.safe_load(stack_config(tmp_path, servers=SERVERS).read_text())},
                       base_dir=tmp_path)
    assert all(c.tls_env == () and not c.probe.tls_name for c in plan(off, ext_proc=True))
