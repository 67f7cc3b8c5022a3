"""The web console in docker compose: one process behind Envoy only (mTLS with the certificate
pki-init issues it), the catalog and its own audit chain read-write, every audit writer's volume,
the audit keys and the policies read-only, no assertion key, and Envoy's admin interface never on
the network."""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import inner_tls
from gateway.config import GatewayConfig, load_config
from gateway.console.settings import INNER_TLS_IDENTITY, ConsoleSettings
from gateway.telemetry.audit_keys import new_master_key
from tests.deploy.test_compose_inner_tls import ENV, INNER, issue, mounts
from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
TIMEOUT = 10.0
START_DEADLINE = 60.0  # the console compiles and checks the policies before it listens
# Volumes holding a key the console must not have.
KEY_VOLUMES = {"inner-pki", "assertion-keys"}
MASTER_KEY = "MCP_GATEWAY_AUDIT_MASTER_KEY"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, dict[str, Any]] = loaded["services"]
    return result


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(GATEWAY)


def console_service(services: dict[str, dict[str, Any]], config: GatewayConfig) -> dict[str, Any]:
    (inst,) = config.console.instances
    return services[inst.host]


def test_console_runs_one_process_reachable_through_envoy_only(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """console.instances is one compose service running gateway.console on the mounted config at
    the configured port, on every interface of its container but published on none, with its
    inner TLS pair (so it serves mTLS only) and a TCP health check on that port."""
    assert config.console.enabled and len(config.console.instances) == 1
    (inst,) = config.console.instances
    service = console_service(services, config)
    command = [str(a) for a in service["command"]]
    assert command[:3] == ["python", "-m", "gateway.console"]
    assert command[command.index("--config") + 1] == "/etc/mcp-gateway/gateway.yaml"
    assert mounts(service)["/etc/mcp-gateway/gateway.yaml"] == ("./deploy/compose/gateway.yaml", "ro")
    assert command[command.index("--port") + 1] == str(inst.port)
    assert "ports" not in service
    for name, value in ENV.items():
        assert service["environment"][name] == value, name
    assert mounts(service)[INNER] == (f"inner-tls-{INNER_TLS_IDENTITY}", "ro")
    assert service["healthcheck"]["test"][-1] == str(inst.port)
    assert service["depends_on"]["pki-init"] == {"condition": "service_completed_successfully"}
    assert service["depends_on"]["state-init"] == {"condition": "service_completed_successfully"}
    # The settings the process builds from this config (one instance, the console's audience).
    settings = ConsoleSettings.from_config(config)
    assert settings.resource == f"{config.public_url.rstrip('/')}/console"


def test_console_state_catalog_read_write_audit_and_policies_read_only(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """The catalog volume (the one ext_authz pins in) read-write at catalog.path's folder, since
    Approve writes there; a volume of its own read-write at audit.dir (its chain, console.jsonl)
    and every audit writer's volume read-only at audit.dir/<writer>; the audit keys read-only
    where audit.signing_key and the master key file are, the master key handed to the variable
    the console reads; the repo's policies read-only at policy.dir; no assertion or CA key."""
    service = console_service(services, config)
    mine = mounts(service)
    catalog_dir = str(PurePosixPath(config.catalog.path).parent)
    ext_authz = services[config.ext_authz.instances[0].host]
    assert mine[catalog_dir] == (mounts(ext_authz)[catalog_dir][0], "")
    writers = {name: src for name, svc in services.items() if svc is not service
               for target, (src, _) in mounts(svc).items() if target == config.audit.dir}
    assert writers, "no audit writer found"
    for writer, volume in writers.items():
        assert mine[f"{config.audit.dir}/{writer}"] == (volume, "ro"), writer
    own, options = mine[config.audit.dir]
    assert options == "" and own not in writers.values()
    init = services["state-init"]  # hands the fresh volume to the image's user
    assert [target for target, (src, _) in mounts(init).items() if src == own][0] in init["command"]
    audit_mounts = {t: m for t, m in mine.items() if t.startswith(f"{config.audit.dir}/")}
    assert len(audit_mounts) == len(writers)
    assert all(options == "ro" for _, options in audit_mounts.values())
    assert config.audit.signing_key is not None
    keys_dir = str(PurePosixPath(config.audit.signing_key).parent)
    assert mine[keys_dir] == ("audit-keys", "ro")
    key_file = PurePosixPath(service["environment"][f"{MASTER_KEY}_FILE"])
    assert str(key_file.parent) == keys_dir
    script = service["entrypoint"][2]
    assert service["entrypoint"][:2] == ["sh", "-c"] and 'exec "$$@"' in script
    assert f'{MASTER_KEY}="$$(cat "$${MASTER_KEY}_FILE")" && export {MASTER_KEY}' in script
    assert mine[config.policy.dir] == ("./policies", "ro")
    assert not {src for src, _ in mine.values()} & KEY_VOLUMES
    assert not [src for src, _ in mine.values()
                if src.startswith("inner-tls-") and src != f"inner-tls-{INNER_TLS_IDENTITY}"]


def test_pki_init_issues_the_console_its_server_and_client_certificate(
        tmp_path: Path, services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """pki-init fills the console's own volume: a certificate from the inner CA naming
    console.<domain> first and the compose host Envoy dials, server auth and client auth (it reads
    the services' GET /metrics, the only thing they admit it to)."""
    assert mounts(services["pki-init"])[f"/out/{INNER_TLS_IDENTITY}"] == (
        f"inner-tls-{INNER_TLS_IDENTITY}", "")
    out = issue(tmp_path, config)
    folder = out / INNER_TLS_IDENTITY
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    assert dns[0] == config.inner_tls.san(INNER_TLS_IDENTITY)
    assert config.console.instances[0].host in dns
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (folder / "tls.key").stat().st_mode & 0o077 == 0


def test_envoy_routes_console_to_it_over_mtls(config: GatewayConfig) -> None:
    """The mounted Envoy config sends /console to the console cluster, which dials the console
    service with Envoy's client certificate and accepts only console.<domain> from the inner CA."""
    envoy: dict[str, Any] = yaml.safe_load(ENVOY.read_text())
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "console"]
    (inst,) = config.console.instances
    [[endpoint]] = [[lb["endpoint"]["address"]["socket_address"] for lb in g["lb_endpoints"]]
                    for g in cluster["load_assignment"]["endpoints"]]
    assert endpoint == {"address": inst.host, "port_value": inst.port}
    assert cluster["health_checks"][0]["http_health_check"] == {"path": "/ready"}
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    common = tls["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["inner_tls_certificate"]
    san = config.inner_tls.san(INNER_TLS_IDENTITY)
    assert common["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": san}}]
    matches = {li["name"]: [r["match"] for chain in li["filter_chains"] for f in chain["filters"]
                            if "route_config" in f["typed_config"]
                            for vh in f["typed_config"]["route_config"]["virtual_hosts"]
                            for r in vh["routes"] if r.get("route", {}).get("cluster") == "console"]
               for li in envoy["static_resources"]["listeners"]}
    assert matches["mcp_gateway_https"] == [{"path_separated_prefix": "/console"}]
    assert all(m in ([], [{"path_separated_prefix": "/console"}]) for m in matches.values())


def test_envoys_admin_interface_stays_off_the_network(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """The console is not given Envoy's admin interface: admin listens on Envoy's loopback, is
    published nowhere, and the console's admin address is its own container's loopback (its
    overview says Envoy's admin does not answer, deploy/compose/README.md)."""
    assert config.admin.host == "127.0.0.1"
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert not [p for p in published if str(p).endswith(f":{config.admin.port}")]
    assert ConsoleSettings.from_config(config).admin_url == f"http://127.0.0.1:{config.admin.port}"
    assert inner_tls.ENVOY_ONLY == frozenset({inner_tls.ENVOY})


def test_console_reads_envoys_stats_listener(
        services: dict[str, dict[str, Any]], config: GatewayConfig) -> None:
    """The console's overview falls back to Envoy's stats-only listener: console.envoy_stats_url
    names the compose service running Envoy on telemetry.envoy_stats_port, a network they share,
    and the rendered listener on that port, which serves GET /stats/prometheus only."""
    url = urlsplit(ConsoleSettings.from_config(config).envoy_stats_url or "")
    mount = "./deploy/compose/envoy.yaml:/etc/envoy/envoy.yaml:ro"
    envoy = next(name for name, svc in services.items() if mount in svc.get("volumes", []))
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http", envoy, config.telemetry.envoy_stats_port, "/stats/prometheus")
    console = console_service(services, config)
    assert set(services[envoy].get("networks", ["default"])) & set(console.get("networks", ["default"]))
    rendered = yaml.safe_load(ENVOY.read_text())
    stats = next(li for li in rendered["static_resources"]["listeners"] if li["name"] == "prometheus_stats")
    assert stats["address"]["socket_address"]["port_value"] == url.port


def _answer(port: int, files: inner_tls.TlsFiles) -> int | None:
    """The HTTP status of GET /ready with ``files``' client certificate; None when the
    connection is refused or closed without an answer (TLS 1.3 alerts arrive with the read)."""
    context = inner_tls.client_context(files, check_hostname=False)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status
    except (TimeoutError, ConnectionError, ssl.SSLError, http.client.RemoteDisconnected):
        return None
    finally:
        conn.close()


def test_the_console_starts_on_the_compose_layout_and_admits_envoy_only(
        tmp_path: Path, config: GatewayConfig) -> None:
    """The real console process, on the compose config with its paths moved under tmp_path (the
    policies at policy.dir, the catalog, its audit folder with read-only per-writer folders in it,
    pki-init's audit signing key, a master key in the variable) and the pair pki-init issued it,
    serves mTLS: Envoy's pki-init certificate gets /ready, another component's (ext_authz, also a
    client) is refused; it opened its own audit chain (no "cannot be opened" in its log)."""
    out = issue(tmp_path, config)
    state = tmp_path / "state"
    text = (tmp_path / "gateway.yaml").read_text()  # issue() wrote the relocated config there
    text = text.replace("dir: /policies", f"dir: {REPO / 'policies'}")
    text = text.replace("/var/lib/mcp-gateway", str(state))
    (state / "catalog").mkdir(parents=True)
    (state / "audit").mkdir()
    for writer in ("ext-authz-1", "files-1"):
        folder = state / "audit" / writer
        folder.mkdir(parents=True)
        folder.chmod(0o500)
    path = tmp_path / "console.yaml"
    path.write_text(text)
    (port,) = free_ports(1, offsets=(0,))
    mine = out / INNER_TLS_IDENTITY
    env = {**os.environ, inner_tls.CERT_ENV: str(mine / "tls.crt"), inner_tls.KEY_ENV: str(mine / "tls.key"),
           inner_tls.CA_ENV: str(mine / "ca.crt"), "PYTHONPATH": str(REPO)}
    # What the compose entrypoint hands over from pki-init's key file.
    env[MASTER_KEY] = new_master_key()

    def files(identity: str) -> inner_tls.TlsFiles:
        folder = out / identity
        return inner_tls.TlsFiles(str(folder / "tls.crt"), str(folder / "tls.key"), str(folder / "ca.crt"))

    log = tmp_path / "console.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.console", "--config", str(path),
                                 "--host", "127.0.0.1", "--port", str(port)],
                                env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_DEADLINE
        status = None
        while status != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the console did not answer /ready in time"
            status = _answer(port, files(inner_tls.ENVOY))
            if status is None:
                time.sleep(0.2)  # polling for the listener, bounded by the deadline
        assert _answer(port, files(inner_tls.EXT_AUTHZ)) in (None, 403)
        assert "audit chain cannot be opened" not in log.read_text()
        assert "key store not opened" not in log.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
