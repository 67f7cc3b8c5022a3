"""The workflow server in docker compose: one process with its run record on a volume of its own,
the delegation key pki-init makes once in a volume only it (and pki-init) mounts, the public JWKS
served on the compose network to ext_authz, the steps sent to Envoy's service while naming
public_url (checked against the edge CA pki-init copies), and Envoy's cluster to it over mTLS."""

from __future__ import annotations

import functools
import http.client
import json
import os
import shlex
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import inner_tls
from gateway.config import GatewayConfig, load_config
from gateway.telemetry.audit_keys import new_master_key
from gatewayctl import compose_init
from gatewayctl.devstack.credentials import inner_identities
from tests.ports import free_ports
from tests.workflow.test_gateway_connect import make_pki

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
ISSUER = "urn:mcp-gateway:workflow"
START_DEADLINE = 60.0
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(GATEWAY)


@functools.cache
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, dict[str, Any]]] = yaml.safe_load(COMPOSE.read_text())
    return loaded["services"]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode)."""
    out = {}
    for entry in service.get("volumes", []):
        head, _, last = entry.rpartition(":")
        if last in ("ro", "rw"):
            source, _, target = head.rpartition(":")
            out[target] = (source, last)
        else:
            out[last] = (head, "rw")
    return out


def holders(volume: str) -> dict[str, str]:
    """service -> mode, for every service mounting the named volume."""
    return {name: mode for name, s in services().items()
            for source, mode in mounts(s).values() if source == volume}


def pki_init_argv() -> list[str]:
    entry: list[str] = services()["pki-init"]["entrypoint"]
    return entry


def test_one_workflow_process_with_its_own_run_record(config: GatewayConfig) -> None:
    """servers.workflow is one compose service running the server with the config's arguments;
    --runs-db's folder is a named volume only it (and state-init, which chowns it) mounts."""
    (server,) = [s for s in config.servers if s.name == "workflow"]
    (instance,) = server.instances
    service = services()[instance.host]
    argv = service["command"]
    assert flag(argv, "-m") == server.module == "mcp_servers.workflow"
    assert flag(argv, "--port") == str(instance.port)
    for name in ("--workflows", "--runs-db", "--delegation-issuer", "--delegation-key",
                 "--gateway-connect", "--gateway-ca"):
        assert flag(argv, name) == flag(list(server.args), name), name
    assert flag(argv, "--delegation-issuer") == ISSUER
    assert "replicas" not in service.get("deploy", {}) and "scale" not in service
    source, mode = mounts(service)[str(Path(flag(argv, "--runs-db")).parent)]
    assert mode == "rw" and source in yaml.safe_load(COMPOSE.read_text())["volumes"]
    assert holders(source) == {"workflow": "rw", "state-init": "rw"}
    assert f"/state/{source}" in services()["state-init"]["command"]
    # Its audit chain on a volume of its own (every audit writer's rule), read by the console.
    audit = flag(argv, "--audit-file")
    audit_volume, audit_mode = mounts(service)[str(Path(audit).parent)]
    assert audit_mode == "rw" and holders(audit_volume) == {
        "workflow": "rw", "state-init": "rw", "console": "ro"}


def test_workflows_folder_is_the_repos_read_only() -> None:
    """--workflows is the repository's workflows/ folder, mounted read-only."""
    service = services()["workflow"]
    assert mounts(service)[flag(service["command"], "--workflows")] == ("./workflows", "ro")


def test_delegation_key_made_by_pki_init_and_read_by_the_workflow_server_only() -> None:
    """--delegation-key's folder is a volume pki-init writes (its --delegation-key is the same
    path) and the workflow server alone reads, read-only."""
    service = services()["workflow"]
    key = flag(service["command"], "--delegation-key")
    volume, mode = mounts(service)[str(Path(key).parent)]
    assert mode == "ro"
    assert holders(volume) == {"workflow": "ro", "pki-init": "rw"}
    assert flag(pki_init_argv(), "--delegation-key") == key
    assert mounts(services()["pki-init"])[str(Path(key).parent)] == (volume, "rw")


def test_the_delegation_issuer_and_its_jwks_server(config: GatewayConfig) -> None:
    """The compose config trusts the workflow issuer as a delegation issuer, not advertised, for
    the step servers only; its jwks_url is the workflow-jwks service serving the file pki-init
    writes (the same volume), and ext_authz starts once that service answers."""
    (issuer,) = [i for i in config.issuers if i.issuer == ISSUER]
    assert issuer.delegation and not issuer.advertise and issuer.algorithms == ("ES256",)
    base = config.public_url.rstrip("/")
    assert issuer.audiences and set(issuer.audiences) <= {
        f"{base}/mcp/{s.name}" for s in config.servers if s.name != "workflow"}
    url = urlsplit(issuer.jwks_url)
    jwks = services()[str(url.hostname)]
    argv = jwks["command"]
    assert argv[:3] == ["python", "-m", "http.server"] and argv[3] == str(url.port)
    directory = flag(argv, "--directory")
    volume, mode = mounts(jwks)[directory]
    assert mode == "ro" and "ports" not in jwks
    written = Path(flag(pki_init_argv(), "--delegation-jwks"))
    assert mounts(services()["pki-init"])[str(written.parent)] == (volume, "rw")
    assert url.path == f"/{written.name}"
    assert url.path in " ".join(jwks["healthcheck"]["test"])
    for name in ("ext-authz-1", "ext-authz-2"):
        assert services()[name]["depends_on"][str(url.hostname)] == {"condition": "service_healthy"}
    # Public keys only: the private key's volume is not there.
    assert holders(volume) == {"workflow-jwks": "ro", "pki-init": "rw"}


def test_steps_reach_envoys_edge_by_service_name_and_check_the_edge_ca(config: GatewayConfig) -> None:
    """--gateway-connect is Envoy's service on its edge listener's port; the steps still name
    public_url (no --gateway-url: the assertion issuer, public_url), and --gateway-ca is the edge
    CA pki-init copies from MCP_GATEWAY_TLS_DIR into a volume the workflow server reads."""
    service = services()["workflow"]
    argv = service["command"]
    host, port = flag(argv, "--gateway-connect").rsplit(":", 1)
    assert host == "envoy" and int(port) == config.listen.port
    assert any(p.endswith(f":{config.listen.port}") for p in services()["envoy"]["ports"])
    assert "--gateway-url" not in argv
    assert service["environment"]["MCP_ASSERTION_ISSUER"] == config.public_url.rstrip("/")
    ca = Path(flag(argv, "--gateway-ca"))
    volume, mode = mounts(service)[str(ca.parent)]
    assert mode == "ro" and ca.name == compose_init.EDGE_CA
    out = flag(pki_init_argv(), "--edge-ca-out")
    assert mounts(services()["pki-init"])[out] == (volume, "rw")
    edge_src = flag(pki_init_argv(), "--edge-src")
    assert mounts(services()["pki-init"])[edge_src][1] == "ro"


def test_envoy_reaches_the_workflow_server_over_mtls(config: GatewayConfig) -> None:
    """The rendered Envoy config's workflow cluster is the compose service over TLS, checking the
    server's inner certificate name; the service reads the pair pki-init issues that identity, and
    Envoy starts once it is healthy."""
    identity = inner_tls.server_identity("workflow")
    assert identity in inner_identities(config)
    rendered = yaml.safe_load(ENVOY.read_text())
    (cluster,) = [c for c in rendered["static_resources"]["clusters"] if c["name"] == "mcp_workflow"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": "workflow", "port_value": 9251}
    tls = cluster["transport_socket"]["typed_config"]
    name = config.inner_tls.san(identity)
    assert tls["@type"].endswith("UpstreamTlsContext") and tls["sni"] == name
    sans = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"]
    assert sans == [{"matcher": {"exact": name}, "san_type": "DNS"}]
    volume = f"inner-tls-{identity}"
    assert mounts(services()["workflow"])["/etc/mcp-gateway/inner"] == (volume, "ro")
    assert mounts(services()["pki-init"])[f"/out/{identity}"] == (volume, "rw")
    assert services()["envoy"]["depends_on"]["workflow"] == {"condition": "service_healthy"}


def relocated(tmp_path: Path) -> Path:
    """The compose config with the folders pki-init writes (volumes in compose) under tmp_path."""
    text = GATEWAY.read_text().replace("/etc/mcp-gateway/assertion-", f"{tmp_path}/assertion-")
    text = text.replace("/etc/mcp-gateway/audit-keys", f"{tmp_path}/audit-keys")
    for folder in ("assertion-keys", "assertion-jwks", "audit-keys", "delegation", "jwks", "edge-ca"):
        (tmp_path / folder).mkdir(exist_ok=True)
    target = tmp_path / "gateway.yaml"
    target.write_text(text)
    return target


def pki_init(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    """pki-init's entry point as compose runs it (the workflow flags included), into folders
    standing for its volumes; (exit status, <out>)."""
    config = load_config(GATEWAY)
    out = tmp_path / "out"
    for identity in (*inner_identities(config), compose_init.SCRAPER):
        (out / identity).mkdir(parents=True, exist_ok=True)
    uid = str(os.geteuid())
    status = compose_init.main([
        "--config", str(relocated(tmp_path)), "--pki", str(tmp_path / "pki"), "--out", str(out),
        "--uid", uid, "--envoy-uid", uid,
        "--delegation-key", str(tmp_path / "delegation" / "workflow-delegation.json"),
        "--delegation-jwks", str(tmp_path / "jwks" / "workflow-jwks.json"), *extra])
    return status, out


def test_pki_init_makes_the_delegation_key_once(tmp_path: Path) -> None:
    """pki-init makes the delegation key (0600 in a 0700 folder) and its public JWKS (0644, no
    private part) on first run, and keeps the key on the next: the same key, the same JWKS."""
    assert pki_init(tmp_path)[0] == 0
    key = tmp_path / "delegation" / "workflow-delegation.json"
    jwks = tmp_path / "jwks" / "workflow-jwks.json"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(jwks.stat().st_mode) == 0o644
    published = json.loads(jwks.read_text())["keys"]
    private = json.loads(key.read_text())["keys"]
    assert len(published) == 1 and "d" not in published[0] and "d" in private[0]
    assert published[0]["kid"] == private[0]["kid"] and published[0]["x"] == private[0]["x"]
    before, before_jwks = key.read_bytes(), jwks.read_bytes()
    jwks.unlink()  # a lost JWKS is written again from the kept key
    assert pki_init(tmp_path)[0] == 0
    assert key.read_bytes() == before and jwks.read_bytes() == before_jwks


def test_pki_init_refuses_a_broken_delegation_key_and_keeps_it(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A delegation key file that is not a key set stops pki-init naming it; the file is kept."""
    key = tmp_path / "delegation" / "workflow-delegation.json"
    key.parent.mkdir()
    key.write_text('{"keys": []}')
    assert pki_init(tmp_path)[0] == 1
    assert "--delegation-key" in capsys.readouterr().err
    assert key.read_text() == '{"keys": []}'


def test_pki_init_without_the_delegation_volume_fails_naming_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A delegation key folder that is not there (the volume not mounted) stops pki-init."""
    config = load_config(GATEWAY)
    out = tmp_path / "out"
    for identity in (*inner_identities(config), compose_init.SCRAPER):
        (out / identity).mkdir(parents=True)
    uid = str(os.geteuid())
    assert compose_init.main([
        "--config", str(relocated(tmp_path)), "--pki", str(tmp_path / "pki"), "--out", str(out),
        "--uid", uid, "--envoy-uid", uid,
        "--delegation-key", str(tmp_path / "missing" / "k.json"),
        "--delegation-jwks", str(tmp_path / "jwks" / "j.json")]) == 1
    assert "--delegation-key" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def edge_src(tmp_path: Path, *, with_ca: bool = True) -> Path:
    src = tmp_path / "edge-src"
    src.mkdir()
    (src / "server.pem").write_text("CERT")
    (src / "server.key").write_text("KEY")
    if with_ca:
        (src / "ca.pem").write_text("EDGE CA")
    return src


def test_pki_init_copies_the_edge_ca_for_the_workflow_server(tmp_path: Path) -> None:
    """With --edge-ca-out, the edge CA (ca.pem next to the edge pair) is copied there, readable."""
    src = edge_src(tmp_path)
    (tmp_path / "edge").mkdir()
    status, _ = pki_init(tmp_path, "--edge-src", str(src), "--edge-out", str(tmp_path / "edge"),
                         "--edge-ca-out", str(tmp_path / "edge-ca"))
    assert status == 0
    copied = tmp_path / "edge-ca" / "ca.pem"
    assert copied.read_text() == "EDGE CA" and stat.S_IMODE(copied.stat().st_mode) == 0o644
    assert not (tmp_path / "edge-ca" / "server.key").exists()


def test_pki_init_without_the_edge_ca_fails_naming_it(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """No ca.pem next to the edge pair: pki-init stops naming the file (the workflow server
    would trust no certificate of Envoy's)."""
    src = edge_src(tmp_path, with_ca=False)
    (tmp_path / "edge").mkdir()
    status, _ = pki_init(tmp_path, "--edge-src", str(src), "--edge-out", str(tmp_path / "edge"),
                         "--edge-ca-out", str(tmp_path / "edge-ca"))
    assert status == 1
    assert str(src / "ca.pem") in capsys.readouterr().err


def _ready(port: int, files: inner_tls.TlsFiles) -> int | None:
    """GET /ready's status with ``files``' client certificate; None when refused or closed."""
    context = inner_tls.client_context(files, check_hostname=False)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT, context=context)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status
    except (TimeoutError, ConnectionError, ssl.SSLError, http.client.RemoteDisconnected):
        return None
    finally:
        conn.close()


def test_the_compose_command_starts_with_the_key_pki_init_made(tmp_path: Path) -> None:
    """The workflow service's command and environment, with its volumes moved under tmp_path,
    start the real server on what pki-init made: the delegation key (mounted read-only) used as
    it is, its inner pair (Envoy's certificate gets /ready, the aggregator's is refused), the
    repo's workflows, the run record on its volume, the edge CA for --gateway-ca."""
    src = edge_src(tmp_path)
    (src / "ca.pem").write_text(_a_ca_pem(tmp_path))
    (tmp_path / "edge").mkdir()
    status, out = pki_init(tmp_path, "--edge-src", str(src), "--edge-out", str(tmp_path / "edge"),
                           "--edge-ca-out", str(tmp_path / "edge-ca"))
    assert status == 0
    key = tmp_path / "delegation" / "workflow-delegation.json"
    made = key.read_bytes()
    service = services()["workflow"]
    identity = inner_tls.server_identity("workflow")
    moves = {"/etc/mcp-gateway/delegation": tmp_path / "delegation",
             "/etc/mcp-gateway/edge-ca": tmp_path / "edge-ca",
             "/etc/mcp-gateway/audit-keys": tmp_path / "audit-keys",
             "/etc/mcp-gateway/assertion-jwks": tmp_path / "assertion-jwks",
             "/etc/mcp-gateway/inner": out / identity,
             "/var/lib/mcp-gateway/workflow": tmp_path / "runs",
             "/var/lib/mcp-gateway/audit": tmp_path / "audit",
             "/srv/workflows": REPO / "workflows"}
    assert set(moves) <= set(mounts(service))
    (tmp_path / "runs").mkdir()
    (tmp_path / "audit").mkdir()
    (tmp_path / "delegation").chmod(0o500)  # mounted read-only

    def moved(value: str) -> str:
        for inside, outside in moves.items():
            if value.startswith(inside):
                return str(outside) + value[len(inside):]
        return value

    (port,) = free_ports(1, offsets=(0,))
    argv = [moved(a) for a in service["command"]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv.remove("--audit-otlp-export")
    assert argv[:3] == ["python", "-m", "mcp_servers.workflow"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_", "OTEL_"))}
    env.update({k: moved(str(v)) for k, v in service["environment"].items()
                if k.startswith(("MCP_ASSERTION", "MCP_INNER_TLS"))})
    env.update({"MCP_GATEWAY_AUDIT_MASTER_KEY": new_master_key(), "PYTHONPATH": str(REPO)})

    def files(who: str) -> inner_tls.TlsFiles:
        folder = out / who
        return inner_tls.TlsFiles(str(folder / "tls.crt"), str(folder / "tls.key"), str(folder / "ca.crt"))

    log = tmp_path / "workflow.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *argv[1:]], env=env, cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_DEADLINE
        answer = None
        while answer != 200:
            assert proc.poll() is None, f"{shlex.join(argv)}\n{log.read_text()}"
            assert time.monotonic() < deadline, "the workflow server did not get ready in time"
            answer = _ready(port, files(inner_tls.ENVOY))
            if answer is None:
                time.sleep(0.2)  # polling for the listener, bounded by the deadline
        assert _ready(port, files(inner_tls.AGGREGATOR)) in (None, 403)
        assert key.read_bytes() == made
        assert (tmp_path / "runs" / "runs.sqlite3").exists()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        (tmp_path / "delegation").chmod(0o700)


def _a_ca_pem(tmp_path: Path) -> str:
    """A CA certificate standing for the edge CA of MCP_GATEWAY_TLS_DIR."""
    folder = tmp_path / "edge-pki"
    folder.mkdir()
    return make_pki(folder).ca_file.read_text()
