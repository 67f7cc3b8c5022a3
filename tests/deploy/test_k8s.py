"""Kubernetes manifests: valid against the Kubernetes JSON schemas (offline, kubernetes-validate
bundles them), consistent with the gateway config, and generated ConfigMaps up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "gateway.yaml")
# MCP servers that own local state (the workflow run record): one process, never two at once.
SINGLE_PROCESS = {"workflow"}


def documents() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_kubernetes_schema(path: Path) -> None:
    """Every document validates strictly (unknown fields rejected) against Kubernetes 1.37."""
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes() -> None:
    """The validator really rejects a misspelt field (so the test above means something)."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"selector": {}, "portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_generated_configmaps_are_current() -> None:
    """The gateway, Envoy and policy ConfigMaps match their sources (re-run the generator)."""
    spec = importlib.util.spec_from_file_location("render_configmaps", K8S / "render_configmaps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, text in module.expected().items():
        assert (K8S / name).read_text() == text, f"stale: python deploy/k8s/render_configmaps.py ({name})"


def test_python_services_scale_and_match_the_config() -> None:
    """ext_authz, ext_proc and each server: Deployment with 2+ replicas, headless Service on the configured
    port, and an HPA on that Deployment; the workflow server, which owns its run record, one
    replica replaced (Recreate) and no HPA."""
    config = load_config(K8S / "gateway.yaml")
    deployments, services = by_kind("Deployment"), by_kind("Service")
    hpas = by_kind("HorizontalPodAutoscaler")
    targets = [("ext-authz", config.ext_authz.instances[0]), ("ext-proc", config.ext_proc.instances[0])]
    targets += [(s.name, s.instances[0]) for s in config.servers]
    for name, instance in targets:
        assert instance.host == f"{name}.mcp-gateway.svc.cluster.local"
        svc = services[name]["spec"]
        assert svc["clusterIP"] == "None"
        assert [p["port"] for p in svc["ports"]] == [instance.port]
        if name in SINGLE_PROCESS:
            assert deployments[name]["spec"]["replicas"] == 1 and name not in hpas
            assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}
        else:
            assert deployments[name]["spec"]["replicas"] >= 2
            assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
            assert hpas[name]["spec"]["minReplicas"] >= 2
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert str(instance.port) in container["command"]


def test_envoy_is_the_only_external_entry() -> None:
    """Only Envoy's Service is reachable from outside, on 443 -> the configured listen port."""
    config = load_config(K8S / "gateway.yaml")
    services = by_kind("Service")
    external = {n for n, s in services.items() if s["spec"].get("type") in ("LoadBalancer", "NodePort")}
    assert external == {"envoy"}
    assert services["envoy"]["spec"]["ports"] == [
        {"name": "https", "port": 443, "targetPort": config.listen.port, "protocol": "TCP"}]
    envoy = by_kind("Deployment")["envoy"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in envoy["containers"][0]["volumeMounts"]}
    assert str(Path(config.tls.cert_file).parent) in mounts


def test_envoy_workers_are_bounded() -> None:
    """Envoy gets a fixed worker count instead of one worker per node CPU."""
    args = by_kind("Deployment")["envoy"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--concurrency") + 1] == "2"
