"""identity.assertion in Kubernetes: the signing key's Secret is mounted by the ext-authz pods
only (group-readable), the JWKS ConfigMap by Envoy (at the file its rendered config serves), the
servers and the aggregator, and each server verifies for its own audience."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
KEYS_SECRET = "mcp-gateway-assertion-keys"
JWKS_CONFIGMAP = "mcp-gateway-assertion-jwks"


def deployments() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d.get("kind") == "Deployment"}


def mounted(pod: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Secret / ConfigMap name -> (its mount path in the pod's one container, the volume)."""
    [container] = pod["containers"]
    by_name = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for mount in container.get("volumeMounts", []):
        volume = by_name[mount["name"]]
        source = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
        if source:
            assert "subPath" not in mount, mount  # whole: an update reaches the pod
            out[source] = (mount["mountPath"], volume)
    return out


def test_key_secret_in_ext_authz_only_and_jwks_where_it_is_read() -> None:
    """The key file's Secret is mounted at identity.keys' folder by ext-authz alone, readable by
    its group only; the JWKS ConfigMap at identity.jwks_file's folder by Envoy, the servers and
    the aggregator; the rendered Envoy config serves that file."""
    config = load_config(K8S / "gateway.yaml")
    identity = config.identity
    assert identity.assertion
    pods = deployments()
    holders = {name for name, pod in pods.items() if KEYS_SECRET in mounted(pod)}
    assert holders == {"ext-authz"}
    path, volume = mounted(pods["ext-authz"])[KEYS_SECRET]
    assert path == str(Path(identity.keys).parent) and volume["secret"]["defaultMode"] == 0o440
    readers = {name for name, pod in pods.items() if JWKS_CONFIGMAP in mounted(pod)}
    servers = {s.name for s in config.servers if s.kind in ("module", "command")}
    assert readers == {"envoy", "aggregator", *servers}
    for name in readers:
        assert mounted(pods[name])[JWKS_CONFIGMAP][0] == str(Path(identity.jwks_file).parent), name
    envoy_config = yaml.safe_load((K8S / "configmap-envoy.yaml").read_text())["data"]["envoy.yaml"]
    assert f'body: {{filename: "{identity.jwks_file}"}}' in envoy_config


def test_servers_verify_for_their_own_audience() -> None:
    """Each server pod gets MCP_ASSERTION_JWKS (identity.jwks_file), _ISSUER (public_url) and
    _AUDIENCE (servers.<name>.audience or <public_url>/mcp/<name>); the aggregator reads them
    from the gateway config it is started with."""
    config = load_config(K8S / "gateway.yaml")
    pods = deployments()
    for server in config.servers:
        [container] = pods[server.name]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MCP_ASSERTION_JWKS"] == config.identity.jwks_file, server.name
        assert env["MCP_ASSERTION_ISSUER"] == config.public_url.rstrip("/"), server.name
        assert env["MCP_ASSERTION_AUDIENCE"] == config.server_audience(server.name), server.name
    [aggregator] = pods["aggregator"]["containers"]
    assert "--config" in aggregator["command"]
