"""Kubernetes NetworkPolicies, evaluated as the API defines them (a pod selected by an Ingress
policy admits only what some rule of such a policy allows): Envoy is the only way in, every hop
the gateway needs is admitted, and nothing else reaches the servers, ext_authz or ext_proc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
NAMESPACE = "mcp-gateway"
OBSERVABILITY = "observability"


def documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def pod_labels(workload: str) -> dict[str, str]:
    (doc,) = [d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")
              and d["metadata"]["name"] == workload]
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is modelled: {selector}"
    match: dict[str, str] = selector.get("matchLabels", {})
    return match.items() <= labels.items()


def peer_matches(peer: dict[str, Any], labels: dict[str, str], namespace: str) -> bool:
    assert set(peer) <= {"podSelector", "namespaceSelector"}, f"not modelled: {peer}"
    if "namespaceSelector" in peer:
        ns_labels = {"kubernetes.io/metadata.name": namespace}
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
        return "podSelector" not in peer or selects(peer["podSelector"], labels)
    return namespace == NAMESPACE and selects(peer["podSelector"], labels)


def admits(source: dict[str, str], namespace: str, target: str, port: int) -> bool:
    """Whether a pod with ``source`` labels in ``namespace`` may open ``port`` on ``target``'s pods."""
    labels = pod_labels(target)
    policies = [d["spec"] for d in documents() if d["kind"] == "NetworkPolicy"
                and d["metadata"]["namespace"] == NAMESPACE and "Ingress" in d["spec"]["policyTypes"]
                and selects(d["spec"]["podSelector"], labels)]
    if not policies:
        return True
    for spec in policies:
        for rule in spec.get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            if "from" not in rule or any(peer_matches(p, source, namespace) for p in rule["from"]):
                return True
    return False


def component(name: str) -> tuple[dict[str, str], str]:
    return pod_labels(name), NAMESPACE


CLIENT = ({"app": "anything"}, "default")
PROMETHEUS = ({"app.kubernetes.io/name": "prometheus"}, OBSERVABILITY)


def ports() -> dict[str, int]:
    config = load_config(K8S / "gateway.yaml")
    found = {"ext-authz": config.ext_authz.instances[0].port, "ext-proc": config.ext_proc.instances[0].port,
             "opa": 8181, "redis": 6379}
    found |= {s.name: s.instances[0].port for s in config.servers}
    return found


def test_every_pod_is_isolated_by_default() -> None:
    """A policy selects every pod of the namespace for Ingress with no rule (deny by default)."""
    defaults = [d for d in documents() if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}]
    assert any("Ingress" in d["spec"]["policyTypes"] and not d["spec"].get("ingress") for d in defaults)


def test_the_hops_the_gateway_needs_are_admitted() -> None:
    """Clients -> Envoy; Envoy -> ext_authz, ext_proc, servers; ext_authz -> servers (catalog
    refresh), OPA, Redis; ext_proc -> OPA; Prometheus -> metrics ports and Envoy's stats."""
    config = load_config(K8S / "gateway.yaml")
    p = ports()
    assert admits(*CLIENT, "envoy", config.listen.port)
    for target in ("ext-authz", "ext-proc", *(s.name for s in config.servers)):
        assert admits(*component("envoy"), target, p[target]), target
    for server in config.servers:
        assert admits(*component("ext-authz"), server.name, p[server.name]), server.name
    assert admits(*component("ext-authz"), "opa", p["opa"])
    assert admits(*component("ext-proc"), "opa", p["opa"])
    assert admits(*component("ext-authz"), "redis", p["redis"])
    offset = config.telemetry.metrics_port_offset
    assert admits(*PROMETHEUS, "ext-authz", p["ext-authz"] + offset)
    assert admits(*PROMETHEUS, "ext-proc", p["ext-proc"] + offset)
    assert config.telemetry.envoy_stats_port is not None
    assert admits(*PROMETHEUS, "envoy", config.telemetry.envoy_stats_port)


@pytest.mark.parametrize("source", ["client", "prometheus", "ext-proc", "files", "opa"])
def test_only_envoy_reaches_the_gateways_inner_services(source: str) -> None:
    """Servers, ext_authz and ext_proc on their serving ports, OPA and Redis: refused from a pod
    elsewhere, from Prometheus, and from gateway pods that have no business there."""
    sender = {"client": CLIENT, "prometheus": PROMETHEUS}.get(source) or component(source)
    p = ports()
    for target, port in p.items():
        allowed = {"ext-authz": {"envoy"}, "ext-proc": {"envoy"}, "opa": {"ext-authz", "ext-proc"},
                   "redis": {"ext-authz"}}.get(target, {"envoy", "ext-authz"})
        assert admits(*sender, target, port) == (source in allowed), (source, target)
    assert not admits(*sender, "envoy", load_config(K8S / "gateway.yaml").admin.port)


def test_the_model_reads_policies_as_kubernetes_does() -> None:
    """The evaluator itself: an unselected pod admits all, a rule without `from` admits any source
    on its ports, and a namespaceSelector matches only that namespace."""
    assert peer_matches({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}, {}, "x")
    assert not peer_matches({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}},
                            {}, "y")
    assert not peer_matches({"podSelector": {"matchLabels": {"a": "b"}}}, {"a": "b"}, "other")
    assert admits(*CLIENT, "envoy", 8443) and not admits(*CLIENT, "envoy", 8444)
