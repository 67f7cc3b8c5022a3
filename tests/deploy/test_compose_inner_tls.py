"""inner_tls in docker compose: the one-shot pki-init issues every component's pair into that
component's own volume (owned by its user), each Python service reads its pair through
MCP_INNER_TLS_*, Envoy its pair and the CA through the checked-in SDS files, the aggregators
reach Envoy's inner listener by a name its certificate carries, and Prometheus scrapes the mTLS
ports with a client-only certificate."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import inner_tls
from gateway.config import GatewayConfig, load_config
from gatewayctl import compose_init
from gatewayctl.devstack.credentials import inner_identities
from gatewayctl.envoy_config import sds_documents

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
SDS = REPO / "deploy" / "compose" / "envoy-sds"
PROMETHEUS = REPO / "deploy" / "compose" / "prometheus.yml"
INNER = "/etc/mcp-gateway/inner"
ASSERTION = "/etc/mcp-gateway/assertion"  # + -keys (private), -jwks (public)
ENV = {inner_tls.CERT_ENV: f"{INNER}/tls.crt", inner_tls.KEY_ENV: f"{INNER}/tls.key",
       inner_tls.CA_ENV: f"{INNER}/ca.crt"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, dict[str, Any]] = loaded["services"]
    return result


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(GATEWAY)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, options) of a service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        out[target] = (source, options[0] if options else "")
    return out


def identity_of_hosts(config: GatewayConfig) -> dict[str, str]:
    """compose service (an instance's host) -> its inner identity."""
    out = {i.host: inner_tls.EXT_AUTHZ for i in config.ext_authz.instances}
    out.update({i.host: inner_tls.EXT_PROC for i in config.ext_proc.instances})
    out.update({i.host: inner_tls.AGGREGATOR for i in config.aggregate.instances})
    for server in config.servers:
        out.update({i.host: inner_tls.server_identity(server.name) for i in server.instances})
    return out


def relocated(tmp_path: Path) -> Path:
    """The compose config with the caller assertion's and the audit keys' folders (volumes in
    compose) under tmp_path."""
    text = GATEWAY.read_text().replace(f"{ASSERTION}-", f"{tmp_path}/assertion-")
    text = text.replace("/etc/mcp-gateway/audit-keys", f"{tmp_path}/audit-keys")
    for folder in ("assertion-keys", "assertion-jwks", "audit-keys"):
        (tmp_path / folder).mkdir(exist_ok=True)
    target = tmp_path / "gateway.yaml"
    target.write_text(text)
    return target


def issue(tmp_path: Path, config: GatewayConfig, *extra: str) -> Path:
    """Run pki-init's entry point as compose does, into folders standing for its volumes."""
    out = tmp_path / "out"
    for identity in (*inner_identities(config), compose_init.SCRAPER):
        (out / identity).mkdir(parents=True, exist_ok=True)
    uid = str(os.geteuid())
    assert compose_init.main(["--config", str(relocated(tmp_path)), "--pki", str(tmp_path / "pki"),
                              "--out", str(out), "--uid", uid, "--envoy-uid", uid, *extra]) == 0
    return out


def test_inner_tls_is_on_in_compose(config: GatewayConfig) -> None:
    """The compose config turns inner_tls on with Envoy's files where its volume is mounted."""
    it = config.inner_tls
    assert it.enabled and it.sds_dir == "/etc/envoy/sds"
    folders = {Path(it.cert_file).parent, Path(it.key_file).parent, Path(it.ca_file).parent}
    assert folders == {Path("/etc/envoy/inner")}


def test_each_python_service_reads_its_own_volume(services: dict[str, dict[str, Any]],
                                                  config: GatewayConfig) -> None:
    """Every ext_authz, ext_proc, aggregator and server instance has the three variables and
    mounts, read-only, the volume pki-init fills with its identity's pair (and no other one)."""
    init = mounts(services["pki-init"])
    for host, identity in identity_of_hosts(config).items():
        service = services[host]
        for name, value in ENV.items():
            assert service["environment"][name] == value, (host, name)
        volume, options = mounts(service)[INNER]
        assert options == "ro" and volume == f"inner-tls-{identity}", host
        assert init[f"/out/{identity}"] == (volume, ""), host
        others = {src for src, _ in mounts(service).values() if src.startswith("inner-")} - {volume}
        assert not others, host
        assert service["depends_on"]["pki-init"] == {"condition": "service_completed_successfully"}


def test_only_pki_init_holds_the_ca_key(services: dict[str, dict[str, Any]]) -> None:
    """The CA's volume is mounted by the one-shot issuer only; each pair's volume by its
    component (and the issuer) only."""
    users: dict[str, set[str]] = {}
    for name, service in services.items():
        for source, _ in mounts(service).values():
            if source.startswith("inner-"):
                users.setdefault(source, set()).add(name)
    assert users.pop("inner-pki") == {"pki-init"}
    assert users.pop("inner-tls-envoy") == {"pki-init", "envoy"}
    assert users.pop("inner-tls-prometheus") == {"pki-init", "prometheus"}
    for volume, names in users.items():
        assert "pki-init" in names and "envoy" not in names and "prometheus" not in names, volume
    init = services["pki-init"]
    assert init["user"] == "0:0" and init["entrypoint"][:3] == ["python", "-m", "gatewayctl.compose_init"]


def test_envoy_reads_its_pair_through_the_checked_in_sds_files(services: dict[str, dict[str, Any]],
                                                              config: GatewayConfig) -> None:
    """deploy/compose/envoy-sds holds what the renderer writes for this config (regenerate with
    write_sds_documents), mounted at inner_tls.sds_dir; Envoy's volume sits at its files' folder
    and its user is the owner pki-init gives that key."""
    expected = sds_documents(config)
    assert expected and {p.name: p.read_text() for p in SDS.iterdir()} == expected
    envoy = services["envoy"]
    assert mounts(envoy)[config.inner_tls.sds_dir] == ("./deploy/compose/envoy-sds", "ro")
    assert mounts(envoy)[str(Path(config.inner_tls.cert_file).parent)] == ("inner-tls-envoy", "ro")
    assert envoy["environment"]["ENVOY_UID"] == str(compose_init.ENVOY_UID)


def test_aggregator_calls_envoy_by_a_name_its_certificate_carries(
        tmp_path: Path, services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """The aggregators' --upstream-base is https to a network alias of Envoy at the inner
    listener's port, and the certificate pki-init issues Envoy names that host."""
    envoy_aliases = services["envoy"]["networks"]["default"]["aliases"]
    out = issue(tmp_path, config)
    cert = x509.load_pem_x509_certificate((out / "envoy" / "tls.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    assert config.aggregate.inner_listener is not None
    for inst in config.aggregate.instances:
        command = services[inst.host]["command"]
        base = urlsplit(command[command.index("--upstream-base") + 1])
        assert base.scheme == "https" and base.port == config.aggregate.inner_listener.port
        assert base.hostname in envoy_aliases and base.hostname in names


def test_pki_init_issues_each_pair_once_and_rotates_on_demand(tmp_path: Path, config: GatewayConfig) -> None:
    """Each folder gets tls.crt / tls.key (0600) / ca.crt: a certificate from the one CA naming
    <identity>.<domain> and the component's compose hosts, clientAuth only where the identity is
    a client; a second run changes nothing, --rotate replaces every pair."""
    out = issue(tmp_path, config)
    ca = x509.load_pem_x509_certificate((out / "envoy" / "ca.crt").read_bytes())
    hosts = identity_of_hosts(config)
    first = {}
    for identity, (_, client) in inner_identities(config).items():
        folder = out / identity
        assert stat.S_IMODE((folder / "tls.key").stat().st_mode) == 0o600
        assert (folder / "ca.crt").read_bytes() == (out / "envoy" / "ca.crt").read_bytes()
        cert = x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        assert dns[0] == config.inner_tls.san(identity)
        assert {h for h, i in hosts.items() if i == identity} <= set(dns), identity
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == client, identity
        first[identity] = (folder / "tls.crt").read_bytes()
    scraper = x509.load_pem_x509_certificate((out / compose_init.SCRAPER / "tls.crt").read_bytes())
    assert list(scraper.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    issue(tmp_path, config)
    assert all((out / i / "tls.crt").read_bytes() == pem for i, pem in first.items())
    issue(tmp_path, config, "--rotate")
    assert all((out / i / "tls.crt").read_bytes() != pem for i, pem in first.items())


def test_pki_init_refuses_a_missing_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A component's folder that is not mounted is an error naming it, not a silent skip."""
    (tmp_path / "out").mkdir()
    assert compose_init.main(["--config", str(relocated(tmp_path)), "--pki", str(tmp_path / "pki"),
                              "--out", str(tmp_path / "out")]) == 1
    assert "is not mounted" in capsys.readouterr().err


def test_prometheus_scrapes_mtls_ports_with_its_client_certificate(
        services: dict[str, dict[str, Any]]) -> None:
    """The servers' and aggregators' /metrics share their mTLS port: those jobs use https with
    the client-only certificate mounted from Prometheus's own volume."""
    scrape = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    folder = PurePosixPath("/etc/prometheus/inner")
    assert mounts(services["prometheus"])[str(folder)] == ("inner-tls-prometheus", "ro")
    for job in ("mcp_servers", "aggregator"):
        assert scrape[job]["scheme"] == "https", job
        assert scrape[job]["tls_config"] == {"ca_file": str(folder / "ca.crt"),
                                             "cert_file": str(folder / "tls.crt"),
                                             "key_file": str(folder / "tls.key")}, job


def test_caller_assertion_is_on_with_the_key_in_ext_authz_only(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """identity.assertion is on; the key file's volume is mounted by pki-init (which makes it)
    and ext_authz (read-only) only; the JWKS's volume by Envoy (at identity.jwks_file, which its
    rendered config serves), the servers and the aggregators, read-only."""
    identity = config.identity
    assert identity.assertion
    key_dir, jwks_dir = str(Path(identity.keys).parent), str(Path(identity.jwks_file).parent)
    users: dict[str, set[str]] = {"assertion-keys": set(), "assertion-jwks": set()}
    for name, service in services.items():
        for target, (source, options) in mounts(service).items():
            if source in users:
                assert target == (key_dir if source == "assertion-keys" else jwks_dir), name
                assert options == ("" if name == "pki-init" else "ro"), name
                users[source].add(name)
    ext_authz = {i.host for i in config.ext_authz.instances}
    readers = {"envoy", *(i.host for i in config.aggregate.instances),
               *(i.host for s in config.servers for i in s.instances)}
    assert users["assertion-keys"] == {"pki-init", *ext_authz}
    assert users["assertion-jwks"] == {"pki-init", *readers}
    assert f'body: {{filename: "{identity.jwks_file}"}}' in (REPO / "deploy/compose/envoy.yaml").read_text()


def test_servers_verify_the_assertion_for_their_own_audience(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """Each server instance gets MCP_ASSERTION_JWKS (identity.jwks_file), _ISSUER (public_url)
    and _AUDIENCE (its own resource id: servers.<name>.audience or <public_url>/mcp/<name>)."""
    for server in config.servers:
        for inst in server.instances:
            env = services[inst.host]["environment"]
            assert env["MCP_ASSERTION_JWKS"] == config.identity.jwks_file, inst.host
            assert env["MCP_ASSERTION_ISSUER"] == config.public_url.rstrip("/"), inst.host
            assert env["MCP_ASSERTION_AUDIENCE"] == config.server_audience(server.name), inst.host


def test_pki_init_makes_the_assertion_key_once(tmp_path: Path, config: GatewayConfig) -> None:
    """pki-init makes the key file (0600, in a private folder) and the JWKS (0644) on first run,
    then keeps them: a second run does not replace the key ext_authz signs with."""
    issue(tmp_path, config)
    keys = tmp_path / "assertion-keys" / "assertion-keys.json"
    jwks = tmp_path / "assertion-jwks" / "assertion-jwks.json"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and stat.S_IMODE(keys.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(jwks.stat().st_mode) == 0o644
    published = json.loads(jwks.read_text())["keys"]
    assert len(published) == 1 and "d" not in published[0]
    before = keys.read_bytes()
    issue(tmp_path, config)
    assert keys.read_bytes() == before
