"""The web console in Kubernetes: one pod (sessions live in its memory), reached by Envoy's pods
only (NetworkPolicy) over mTLS with its cert-manager certificate, the catalog and the audit
folder (its own chain) read-write, the policies read-only, the audit keys but no assertion key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.console.settings import INNER_TLS_IDENTITY, ConsoleSettings
from tests.deploy.test_k8s_network import CLIENT, PROMETHEUS, admits, component

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# Secrets holding a key the console must not have.
KEY_SECRETS = {"mcp-gateway-assertion-keys", "mcp-gateway-workflow-delegation"}


@pytest.fixture(scope="module")
def config() -> GatewayConfig:
    return load_config(K8S / "gateway.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def named(kind: str, name: str, path: Path) -> dict[str, Any]:
    (doc,) = [d for d in documents(path) if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod(name: str) -> dict[str, Any]:
    (doc,) = [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml" for d in documents(p)
              if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def mounts(name: str) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (mount, volume) of the pod's one container."""
    spec = pod(name)
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def test_one_console_process_on_the_configured_port(config: GatewayConfig) -> None:
    """console.instances is one Service host: a headless Service in front of a Deployment of one
    replica, replaced (never surged: two processes would split the sessions), running
    gateway.console on the mounted config at that port with its inner TLS pair."""
    (inst,) = config.console.instances
    name = inst.host.split(".")[0]
    deployment = named("Deployment", name, K8S / "console.yaml")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    hpas = [d for p in K8S.glob("*.yaml") if p.name != "gateway.yaml" for d in documents(p)
            if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == name]
    assert not hpas
    (container,) = pod(name)["containers"]
    argv = container["command"]
    assert argv[:3] == ["python", "-m", "gateway.console"]
    assert argv[argv.index("--config") + 1] == "/etc/mcp-gateway/gateway.yaml"
    assert argv[argv.index("--port") + 1] == str(inst.port)
    service = named("Service", name, K8S / "console.yaml")["spec"]
    assert service["clusterIP"] == "None" and [p["port"] for p in service["ports"]] == [inst.port]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MCP_INNER_TLS_CERT_FILE"] == "/etc/mcp-gateway/inner/tls.crt"
    mount, volume = mounts(name)["/etc/mcp-gateway/inner"]
    assert mount["readOnly"] and volume["secret"]["secretName"] == f"mcp-gateway-inner-{INNER_TLS_IDENTITY}"
    assert ConsoleSettings.from_config(config).port == inst.port


def test_console_volumes(config: GatewayConfig) -> None:
    """The catalog at the same sub-path of the shared claim as ext-authz, read-write (Approve);
    the claim's whole audit/ folder (every pod's audit/<pod>/ below, the console's own chain at its
    top) read-write at audit.dir; the policies ConfigMap OPA serves read-only at policy.dir; the
    config; the audit keys (its chain is signed and sealed) but no assertion or delegation key."""
    mine = mounts("console")
    catalog_dir = str(Path(config.catalog.path).parent)
    mount, volume = mine[catalog_dir]
    authz_mount, authz_volume = mounts("ext-authz")[catalog_dir]
    assert volume == authz_volume and mount["subPath"] == authz_mount["subPath"]
    assert not mount.get("readOnly")
    mount, volume = mine[config.audit.dir]
    assert volume["persistentVolumeClaim"] == authz_volume["persistentVolumeClaim"]
    assert not mount.get("readOnly") and mount["subPath"] == "audit"
    assert mounts("ext-authz")[config.audit.dir][0]["subPathExpr"].startswith("audit/")
    mount, volume = mine[config.policy.dir]
    assert mount["readOnly"] is True and volume["configMap"]["name"] == "opa-policies"
    opa_volumes = {v.get("configMap", {}).get("name") for v in pod("opa")["volumes"]}
    assert "opa-policies" in opa_volumes
    assert mine["/etc/mcp-gateway"][1]["configMap"]["name"] == "mcp-gateway-config"
    secrets = {v["secret"]["secretName"] for _, v in mine.values() if "secret" in v}
    (container,) = pod("console")["containers"]
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                if "secretKeyRef" in e.get("valueFrom", {})}
    assert not secrets & KEY_SECRETS
    assert secrets == {f"mcp-gateway-inner-{INNER_TLS_IDENTITY}", "mcp-gateway-console-oidc",
                       "mcp-gateway-audit-signing-key", "mcp-gateway-audit-master-key"}


@pytest.mark.parametrize("source", ["client", "prometheus", "ext-authz", "ext-proc", "aggregator", "files"])
def test_only_envoy_reaches_the_console(source: str, config: GatewayConfig) -> None:
    """The console's port admits Envoy's pods; clients, Prometheus and every other gateway pod
    are refused."""
    port = config.console.instances[0].port
    assert admits(*component("envoy"), "console", port)
    sender = {"client": CLIENT, "prometheus": PROMETHEUS}.get(source) or component(source)
    assert not admits(*sender, "console", port)


def test_envoy_calls_the_console_over_mtls(config: GatewayConfig) -> None:
    """The Envoy ConfigMap routes /console to a cluster that dials the console Service with
    Envoy's client certificate and accepts only console.<domain> from the inner CA; the
    certificate cert-manager issues the console names that and the Service host, server auth only."""
    data = named("ConfigMap", "envoy-config", K8S / "configmap-envoy.yaml")["data"]
    envoy = yaml.safe_load(data["envoy.yaml"])
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "console"]
    (inst,) = config.console.instances
    addresses = [lb["endpoint"]["address"]["socket_address"]
                 for g in cluster["load_assignment"]["endpoints"] for lb in g["lb_endpoints"]]
    assert addresses == [{"address": inst.host, "port_value": inst.port}]
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "inner_tls_certificate"
    san = config.inner_tls.san(INNER_TLS_IDENTITY)
    assert common["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": san}}]
    certificate = named("Certificate", f"mcp-gateway-inner-{INNER_TLS_IDENTITY}",
                        K8S / "cert-manager" / "inner-certificates.yaml")["spec"]
    assert certificate["dnsNames"] == [san, inst.host]
    assert certificate["secretName"] == f"mcp-gateway-inner-{INNER_TLS_IDENTITY}"
    assert "client auth" in certificate["usages"] and "server auth" in certificate["usages"]
