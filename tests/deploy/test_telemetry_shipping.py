"""Telemetry leaves the services in both deployments: audit entries reach the collector as well
as each writer's file, the services' OTLP endpoint comes from the standard variable, and compose
publishes the edge on one named interface."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COLLECTOR = REPO / "deploy/compose/otel-collector.yaml"
K8S = REPO / "deploy/k8s"
AUDIT_WRITERS = ("files", "database")  # MCP servers with --audit-file; ext_authz uses the config


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def k8s_containers() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    out[container["name"]] = container
    return out


def test_compose_publishes_443_on_a_named_interface() -> None:
    """Envoy's 443 is bound to ${GATEWAY_BIND}, loopback unless the operator names another."""
    ports = compose_services()["envoy"]["ports"]
    config = load_config(REPO / "deploy/compose/gateway.yaml")
    assert ports == [f"${{GATEWAY_BIND:-127.0.0.1}}:443:{config.listen.port}"]
    for name, svc in compose_services().items():
        for port in svc.get("ports", []):
            assert re.match(r"^(\$\{GATEWAY_BIND:-127\.0\.0\.1\}|127\.0\.0\.1):", port), (name, port)


def test_compose_audit_reaches_the_collector() -> None:
    """Every audit writer exports its entries as OTLP logs, and the collector's logs pipeline
    writes them to a file on a volume of its own (owned by its user through state-init)."""
    assert load_config(REPO / "deploy/compose/gateway.yaml").audit.otlp_export is True
    services = compose_services()
    for name, svc in services.items():
        command = svc.get("command", [])
        if "--audit-file" in command:
            assert "--audit-otlp-export" in command, name
    assert any("--audit-file" in s.get("command", []) for s in services.values())
    collector: dict[str, Any] = yaml.safe_load(COLLECTOR.read_text())
    logs = collector["service"]["pipelines"]["logs"]
    assert logs["receivers"] == ["otlp"]
    [exporter] = logs["exporters"]
    path = Path(collector["exporters"][exporter]["path"])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["otel-collector"]["volumes"]}
    volume = mounts[str(path.parent)]
    assert volume in yaml.safe_load(COMPOSE.read_text())["volumes"]
    init = services["state-init"]
    target = next(m.split(":")[1] for m in init["volumes"] if m.split(":")[0] == volume)
    assert target in init["command"] and init["command"][1] == "10001:10001"
    assert services["otel-collector"]["depends_on"]["state-init"]["condition"] == \
        "service_completed_successfully"


def test_k8s_audit_reaches_the_collector() -> None:
    """In Kubernetes too: ext_authz by audit.otlp_export, the MCP servers by --audit-otlp-export,
    and every container that exports knows the collector from OTEL_EXPORTER_OTLP_ENDPOINT."""
    assert load_config(K8S / "gateway.yaml").audit.otlp_export is True
    containers = k8s_containers()
    for name in AUDIT_WRITERS:
        assert "--audit-otlp-export" in containers[name]["command"], name
    for name, container in containers.items():
        if container["image"].startswith("mcp-gateway"):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").startswith("http"), name
