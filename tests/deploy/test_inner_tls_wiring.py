"""inner_tls in Kubernetes: every inner component's pod reads its own cert-manager Secret
(mounted whole) through MCP_INNER_TLS_*, Envoy reads its pair and the CA through the SDS files of
its ConfigMap (watching the Secret's folder), the aggregator calls Envoy over https, and the
kubelet probes only the ports it can still reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway import inner_tls
from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
ENV = {inner_tls.CERT_ENV: "tls.crt", inner_tls.KEY_ENV: "tls.key", inner_tls.CA_ENV: "ca.crt"}


def documents(folder: Path) -> list[dict[str, Any]]:
    return [d for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in documents(K8S)
            if d.get("kind") == "Deployment"}


def secrets_by_identity(domain: str) -> dict[str, str]:
    """identity -> the Secret its cert-manager Certificate writes."""
    out = {}
    for doc in documents(K8S / "cert-manager"):
        names = doc.get("spec", {}).get("dnsNames") or []
        if doc.get("kind") == "Certificate" and names and names[0].endswith(f".{domain}"):
            out[names[0].removesuffix(f".{domain}")] = doc["spec"]["secretName"]
    return out


def mounted_secret(pod: dict[str, Any], container: dict[str, Any], folder: str) -> str:
    """The Secret mounted whole (no subPath) at ``folder``."""
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == folder)
    assert "subPath" not in mount and "subPathExpr" not in mount
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "items" not in volume["secret"]
    name: str = volume["secret"]["secretName"]
    return name


def test_inner_tls_is_on_in_kubernetes() -> None:
    config = load_config(K8S / "gateway.yaml")
    assert config.inner_tls.enabled and config.inner_tls.sds_dir == "/etc/envoy/config"


def test_each_python_pod_reads_its_own_certificate() -> None:
    """ext-authz, ext-proc, the aggregator and each module/command server: the three variables
    name tls.crt, tls.key and ca.crt of the Secret whose certificate names that identity."""
    config = load_config(K8S / "gateway.yaml")
    secrets = secrets_by_identity(config.inner_tls.domain)
    pods = deployments()
    identities = {"ext-authz": inner_tls.EXT_AUTHZ, "ext-proc": inner_tls.EXT_PROC,
                  "aggregator": inner_tls.AGGREGATOR}
    identities.update({s.name: inner_tls.server_identity(s.name) for s in config.servers
                       if s.kind in ("module", "command")})
    for deployment, identity in identities.items():
        pod = pods[deployment]
        [container] = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        folders = {str(Path(env[name]).parent) for name in ENV}
        assert len(folders) == 1, deployment
        for name, file in ENV.items():
            assert Path(env[name]).name == file, (deployment, name)
        assert mounted_secret(pod, container, folders.pop()) == secrets[identity], deployment


def test_envoy_reads_its_pair_through_sds_watching_the_secret() -> None:
    """Envoy mounts its inner Secret at inner_tls.cert_file's folder; the SDS files in envoy-config
    name the pair and the CA and watch that folder (a renewal is a ..data swap there)."""
    config = load_config(K8S / "gateway.yaml")
    it = config.inner_tls
    pod = deployments()["envoy"]
    [container] = [c for c in pod["containers"] if c["name"] == "envoy"]
    folder = str(Path(it.cert_file).parent)
    assert Path(it.key_file).parent == Path(it.ca_file).parent == Path(folder)
    assert mounted_secret(pod, container, folder) == secrets_by_identity(it.domain)[inner_tls.ENVOY]
    assert (Path(it.cert_file).name, Path(it.key_file).name, Path(it.ca_file).name) == \
        ("tls.crt", "tls.key", "ca.crt")
    configmap = next(d for d in documents(K8S) if d.get("kind") == "ConfigMap"
                     and d["metadata"]["name"] == "envoy-config")["data"]
    secrets = [yaml.safe_load(text)["resources"][0] for name, text in configmap.items()
               if name.startswith("inner-tls-")]
    assert {s["name"] for s in secrets} == {"inner_tls_certificate", "inner_tls_ca"}
    for secret in secrets:
        body = secret.get("tls_certificate") or secret["validation_context"]
        assert body["watched_directory"] == {"path": folder}, secret["name"]
    for name in ("inner-tls-certificate.yaml", "inner-tls-ca.yaml"):
        assert f"/etc/envoy/config/{name}" in configmap["envoy.yaml"]


def test_the_aggregator_calls_envoy_over_tls_and_probes_need_no_certificate() -> None:
    """The aggregator's legs go to https://envoy-inner (Envoy's certificate names that host); the
    ports that require a client certificate are probed by TCP."""
    pods = deployments()
    [aggregator] = pods["aggregator"]["containers"]
    base = aggregator["command"][aggregator["command"].index("--upstream-base") + 1]
    assert base.startswith("https://envoy-inner.")
    for name in ("ext-authz", "ext-proc", "files", "database", "aggregator"):
        [container] = pods[name]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert set(container[probe]) - {"periodSeconds"} == {"tcpSocket"}, (name, probe)
