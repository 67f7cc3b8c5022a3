"""The workflow server in Kubernetes: one pod with its run record on a claim of its own, the
delegation key from the operator's Secret in that pod only, the workflows from a generated
ConfigMap, its delegation issuer in the gateway config with the public keys served in the
namespace to the token verifiers only, and only Envoy and ext_authz reaching the server."""

from __future__ import annotations

import functools
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.telemetry.audit_chain import generate_signing_key
from gateway.telemetry.audit_keys import new_master_key
from mcp_servers.workflow.delegation import load_or_create_key, publish_jwks
from tests.deploy.test_k8s_network import CLIENT, PROMETHEUS, admits, component
from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
ISSUER = "urn:mcp-gateway:workflow"
DELEGATION_SECRET = "mcp-gateway-workflow-delegation"
START_DEADLINE = 60.0


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(K8S / "gateway.yaml")


@functools.cache
def documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container_of(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The Deployment's one container and its volumes by name."""
    spec = named("Deployment", name)["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return container, {v["name"]: v for v in spec["volumes"]}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_one_workflow_process_with_its_own_run_record(config: GatewayConfig) -> None:
    """servers.workflow's Service is backed by one replica, replaced (Recreate), running the
    server with the config's arguments; --runs-db sits on a ReadWriteOnce claim only it mounts."""
    (server,) = [s for s in config.servers if s.name == "workflow"]
    deployment = named("Deployment", "workflow")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container, volumes = container_of("workflow")
    argv = container["command"]
    assert flag(argv, "-m") == server.module == "mcp_servers.workflow"
    for name in ("--workflows", "--runs-db", "--delegation-issuer", "--delegation-key"):
        assert flag(argv, name) == flag(list(server.args), name), name
    assert flag(argv, "--delegation-issuer") == ISSUER
    runs = Path(flag(argv, "--runs-db")).parent
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(runs)]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert named("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    users = [d["metadata"]["name"] for d in documents() if d["kind"] == "Deployment"
             for v in d["spec"]["template"]["spec"]["volumes"]
             if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    assert users == ["workflow"]


def test_delegation_key_in_the_workflow_pod_only(config: GatewayConfig) -> None:
    """The operator's Secret is mounted, read-only and group-readable only, at --delegation-key's
    folder of the workflow pod, and by no other Deployment."""
    container, volumes = container_of("workflow")
    key = Path(flag(container["command"], "--delegation-key"))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(key.parent)]
    secret = volumes[mount["name"]]["secret"]
    assert secret == {"secretName": DELEGATION_SECRET, "defaultMode": 0o440} and mount["readOnly"]
    holders = [d["metadata"]["name"] for d in documents() if d["kind"] == "Deployment"
               for v in d["spec"]["template"]["spec"]["volumes"]
               if v.get("secret", {}).get("secretName") == DELEGATION_SECRET]
    assert holders == ["workflow"]


def test_workflow_files_come_from_the_generated_configmap() -> None:
    """--workflows is the mcp-gateway-workflows ConfigMap (every workflows/*.yaml), mounted as a
    folder, and the pod rolls when it changes (checksum annotation)."""
    container, volumes = container_of("workflow")
    folder = flag(container["command"], "--workflows")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert volumes[mount["name"]]["configMap"]["name"] == "mcp-gateway-workflows" and "subPath" not in mount
    data = named("ConfigMap", "mcp-gateway-workflows")["data"]
    assert set(data) == {p.name for p in (REPO / "workflows").glob("*.yaml")} and data
    annotations = named("Deployment", "workflow")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/mcp-gateway-workflows"]


def test_the_delegation_issuer_and_its_keys(config: GatewayConfig) -> None:
    """The gateway config trusts the workflow issuer as a delegation issuer, not advertised, for
    the step servers only (never /mcp, the console or the workflow server); its jwks_url is the
    workflow-jwks Service, which serves the operator's JWKS ConfigMap."""
    (issuer,) = [i for i in config.issuers if i.issuer == ISSUER]
    assert issuer.delegation and not issuer.advertise and issuer.algorithms == ("ES256",)
    base = config.public_url.rstrip("/")
    assert set(issuer.audiences) <= {f"{base}/mcp/{s.name}" for s in config.servers if s.name != "workflow"}
    url = urlsplit(issuer.jwks_url)
    service = named("Service", "workflow-jwks")
    assert url.hostname == "workflow-jwks.mcp-gateway.svc.cluster.local"
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    container, volumes = container_of("workflow-jwks")
    directory = flag(container["command"], "--directory")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert volumes[mount["name"]]["configMap"]["name"] == "mcp-gateway-workflow-jwks"
    assert container["readinessProbe"]["httpGet"]["path"] == url.path


@pytest.mark.parametrize("source", ["client", "prometheus", "ext-proc", "aggregator", "files", "console"])
def test_who_reaches_the_workflow_server_and_its_keys(source: str, config: GatewayConfig) -> None:
    """The server's port admits Envoy and ext_authz (catalog) only; the JWKS server the token
    verifiers (ext_authz, the console) only."""
    (server,) = [s for s in config.servers if s.name == "workflow"]
    port = server.instances[0].port
    (issuer,) = [i for i in config.issuers if i.issuer == ISSUER]
    jwks_port = urlsplit(issuer.jwks_url).port
    assert jwks_port is not None
    assert admits(*component("envoy"), "workflow", port) and admits(*component("ext-authz"), "workflow", port)
    assert admits(*component("ext-authz"), "workflow-jwks", jwks_port)
    sender = {"client": CLIENT, "prometheus": PROMETHEUS}.get(source) or component(source)
    assert not admits(*sender, "workflow", port)
    assert admits(*sender, "workflow-jwks", jwks_port) == (source == "console")


def _ready(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status
    except (ConnectionError, TimeoutError):
        return None
    finally:
        conn.close()


def test_the_pods_command_starts_with_the_operators_key(tmp_path: Path) -> None:
    """The workflow container's command and environment, with its mounts moved under tmp_path,
    start the real server: the key made by README's command and mounted read-only (0440, as the
    Secret is) is used as it is, the workflows of the ConfigMap load, the run record opens on
    its claim; the JWKS README's command publishes has the key's public half only."""
    keys = tmp_path / "keys"
    ring = load_or_create_key(keys / "workflow-delegation.json")
    publish_jwks(ring, keys / "workflow-jwks.json")
    published = json.loads((keys / "workflow-jwks.json").read_text())["keys"]
    assert len(published) == 1 and "d" not in published[0]
    container, _ = container_of("workflow")
    mounts = {"/etc/mcp-gateway/delegation": tmp_path / "delegation",
              "/etc/mcp-gateway/audit-keys": tmp_path / "audit-keys",
              "/etc/mcp-gateway/assertion-jwks": tmp_path / "assertion-jwks",
              "/var/lib/mcp-gateway": tmp_path / "state",
              "/srv/workflows": tmp_path / "workflows"}
    for folder in mounts.values():
        folder.mkdir()
    for name, text in named("ConfigMap", "mcp-gateway-workflows")["data"].items():
        (mounts["/srv/workflows"] / name).write_text(text)
    (mounts["/var/lib/mcp-gateway"] / "workflow").mkdir()
    (mounts["/var/lib/mcp-gateway"] / "audit").mkdir()
    key = mounts["/etc/mcp-gateway/delegation"] / "workflow-delegation.json"
    key.write_bytes((keys / "workflow-delegation.json").read_bytes())
    key.chmod(0o440)
    mounts["/etc/mcp-gateway/delegation"].chmod(0o500)
    generate_signing_key(mounts["/etc/mcp-gateway/audit-keys"] / "audit-signing.pem")
    # Any ES256 public JWKS stands for the gateway's caller assertion keys.
    publish_jwks(load_or_create_key(keys / "assertion.json"),
                 mounts["/etc/mcp-gateway/assertion-jwks"] / "assertion-jwks.json")

    def moved(value: str) -> str:
        for inside, outside in mounts.items():
            if value.startswith(inside):
                return str(outside) + value[len(inside):]
        return value

    (port,) = free_ports(1, offsets=(0,))
    argv = [moved(a) for a in container["command"]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv.remove("--audit-otlp-export")
    assert argv[0] == "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MCP_", "OTEL_"))}
    env.update({e["name"]: moved(e["value"]) for e in container["env"]
                if "value" in e and not e["name"].startswith(("MCP_INNER_TLS", "OTEL_"))})
    env.update({"MCP_GATEWAY_AUDIT_MASTER_KEY": new_master_key(), "POD_NAME": "workflow-0",
                "PYTHONPATH": str(REPO)})
    log = tmp_path / "workflow.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, *argv[1:]], env=env, cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while _ready(port) != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the workflow server did not get ready in time"
            time.sleep(0.2)  # polling for the listener, bounded by the deadline
        assert key.read_bytes() == (keys / "workflow-delegation.json").read_bytes()
        assert (mounts["/var/lib/mcp-gateway"] / "workflow" / "runs.sqlite3").exists()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
