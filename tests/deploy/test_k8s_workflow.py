"""The workflow server in Kubernetes: one pod with its run record on a claim of its own, the
delegation key from the operator's Secret in that pod only, the workflows from a generated
ConfigMap, its delegation issuer in the gateway config with the public keys served in the
namespace to the token verifiers only, and only Envoy and ext_authz reaching the server."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from tests.deploy.test_k8s_network import CLIENT, PROMETHEUS, admits, component

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
ISSUER = "urn:mcp-gateway:workflow"
DELEGATION_SECRET = "mcp-gateway-workflow-delegation"


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
