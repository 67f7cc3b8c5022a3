"""Kubernetes certificates by cert-manager: the edge certificate lands in the Secret Envoy mounts
(whole, no subPath) and Envoy reads it through SDS watching that folder; one inner certificate
per inner_tls identity, named as the peers check it, from an inner CA Issuer."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gateway import inner_tls
from gateway.config import load_config
from gateway.console.settings import INNER_TLS_IDENTITY as CONSOLE_IDENTITY

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
CERT_MANAGER = K8S / "cert-manager"
# Who calls an inner component: Envoy, ext_authz (catalog fetches), the aggregator, and the console
# (the services' GET /metrics only).
CLIENTS = {inner_tls.ENVOY, inner_tls.EXT_AUTHZ, inner_tls.AGGREGATOR, CONSOLE_IDENTITY}


def docs(folder: Path) -> list[dict[str, Any]]:
    return [d for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def by(kind: str, folder: Path = CERT_MANAGER) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs(folder) if d.get("kind") == kind}


def envoy_pod() -> dict[str, Any]:
    spec: dict[str, Any] = by("Deployment", K8S)["envoy"]["spec"]["template"]["spec"]
    return spec


def test_cert_manager_documents_are_well_formed() -> None:
    """Every document is a cert-manager v1 Issuer or Certificate in the gateway's namespace, and
    every issuerRef names an Issuer here or a ClusterIssuer (the cluster's own)."""
    issuers = by("Issuer")
    for doc in docs(CERT_MANAGER):
        assert doc["apiVersion"] == "cert-manager.io/v1" and doc["kind"] in ("Issuer", "Certificate")
        assert doc["metadata"]["namespace"] == "mcp-gateway"
        if doc["kind"] == "Certificate":
            ref = doc["spec"]["issuerRef"]
            assert ref["kind"] == "ClusterIssuer" or ref["name"] in issuers, doc["metadata"]["name"]


def test_the_edge_certificate_is_the_secret_envoy_serves() -> None:
    """The edge Certificate writes the Secret Envoy mounts whole at tls.cert_file's folder, names
    public_url's host, and gets a new key at each renewal."""
    config = load_config(K8S / "gateway.yaml")
    edge = by("Certificate")["mcp-gateway-edge"]["spec"]
    pod = envoy_pod()
    volume = next(v for v in pod["volumes"]
                  if v.get("secret", {}).get("secretName") == edge["secretName"])
    [container] = [c for c in pod["containers"] if c["name"] == "envoy"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount and mount["mountPath"] == str(Path(config.tls.cert_file).parent)
    items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
    assert items == {"tls.crt": Path(config.tls.cert_file).name, "tls.key": Path(config.tls.key_file).name}
    assert urlsplit(config.public_url).hostname in edge["dnsNames"]
    assert edge["privateKey"]["rotationPolicy"] == "Always"
    hours = {k: int(edge[k].removesuffix("h")) for k in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]


def test_envoy_reads_the_edge_certificate_through_sds_from_its_configmap() -> None:
    """tls.sds_file sits in the mounted envoy-config ConfigMap, and the SDS document there names
    the certificate files and watches the Secret's folder (where the kubelet swaps ..data)."""
    config = load_config(K8S / "gateway.yaml")
    assert config.tls.sds_file is not None
    pod = envoy_pod()
    [container] = [c for c in pod["containers"] if c["name"] == "envoy"]
    config_volume = next(v["name"] for v in pod["volumes"]
                         if v.get("configMap", {}).get("name") == "envoy-config")
    mount = next(m for m in container["volumeMounts"] if m["name"] == config_volume)
    assert "subPath" not in mount and mount["mountPath"] == str(Path(config.tls.sds_file).parent)
    configmap = by("ConfigMap", K8S)["envoy-config"]["data"]
    [secret] = yaml.safe_load(configmap[Path(config.tls.sds_file).name])["resources"]
    certificate = secret["tls_certificate"]
    assert certificate["certificate_chain"] == {"filename": config.tls.cert_file}
    assert certificate["private_key"] == {"filename": config.tls.key_file}
    assert certificate["watched_directory"] == {"path": str(Path(config.tls.cert_file).parent)}
    assert f'path_config_source: {{path: "{config.tls.sds_file}"}}' in configmap["envoy.yaml"]


def test_one_inner_certificate_per_identity() -> None:
    """Envoy, ext-authz, ext-proc, the aggregator, the console and each module/command server have a
    certificate naming <identity>.<domain> first and the Service host its clients dial; client
    auth only for the clients; all from the inner CA Issuer, itself backed by a CA Certificate."""
    config = load_config(K8S / "gateway.yaml")
    domain = config.inner_tls.domain
    hosts = {inner_tls.ENVOY: "envoy-inner.mcp-gateway.svc.cluster.local",
             inner_tls.EXT_AUTHZ: config.ext_authz.instances[0].host,
             inner_tls.EXT_PROC: config.ext_proc.instances[0].host,
             inner_tls.AGGREGATOR: config.aggregate.instances[0].host}
    for server in config.servers:
        if server.kind in ("module", "command"):
            hosts[inner_tls.server_identity(server.name)] = server.instances[0].host
    if config.console.enabled:
        hosts[CONSOLE_IDENTITY] = config.console.instances[0].host
    certificates = by("Certificate")
    named = [c["spec"] for c in certificates.values() if c["spec"].get("dnsNames")]
    inner = {spec["dnsNames"][0].removesuffix(f".{domain}"): spec for spec in named
             if spec["dnsNames"][0].endswith(f".{domain}")}
    assert set(inner) == set(hosts)
    for identity, spec in inner.items():
        assert spec["dnsNames"][1:] == [hosts[identity]], identity
        assert ("client auth" in spec["usages"]) == (identity in CLIENTS), identity
        assert "server auth" in spec["usages"]
        assert spec["issuerRef"] == {"kind": "Issuer", "name": "mcp-gateway-inner-ca",
                                     "group": "cert-manager.io"}
        assert spec["secretName"].startswith("mcp-gateway-inner-")
    ca_secret = by("Issuer")["mcp-gateway-inner-ca"]["spec"]["ca"]["secretName"]
    root = next(c["spec"] for c in certificates.values() if c["spec"]["secretName"] == ca_secret)
    assert root["isCA"] is True and root["issuerRef"]["name"] == "mcp-gateway-inner-selfsigned"
    assert "selfSigned" in by("Issuer")["mcp-gateway-inner-selfsigned"]["spec"]
