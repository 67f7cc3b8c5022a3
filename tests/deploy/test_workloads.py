"""Every component a deploy config names runs somewhere: each host of the gateway config (ext_authz,
ext_proc, every server and backend, OPA, Redis) and each endpoint of the rendered Envoy config is a
workload of the deployment (a Kubernetes Service backed by a Deployment/StatefulSet, or a compose
service) listening on the named port. Checked statically, for deploy/k8s and docker-compose.yml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
NAMESPACE = "mcp-gateway"
CLUSTER_SUFFIX = f".{NAMESPACE}.svc.cluster.local"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
COMPOSE_ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
COMPOSE_COLLECTOR = REPO / "deploy" / "compose" / "otel-collector.yaml"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# Ports a third-party image listens on without being told (compose passes no port for them).
IMAGE_DEFAULT_PORTS = {"redis": 6379}


@dataclass(frozen=True)
class Component:
    """A process the gateway config expects at host:port; ``module`` when it is ours."""

    role: str  # ext_authz, ext_proc, server:<name>, backend:<name>, console, opa, redis
    host: str
    port: int
    module: str | None


def components(config: GatewayConfig) -> list[Component]:
    """Every host:port the gateway config names (ours with the module that must run there)."""
    found = [Component("ext_authz", i.host, i.port, "ext_authz") for i in config.ext_authz.instances]
    found += [Component("ext_proc", i.host, i.port, "ext_proc") for i in config.ext_proc.instances]
    for server in config.servers:
        module = server.module if server.kind == "module" else None
        found += [Component(f"server:{server.name}", i.host, i.port, module) for i in server.instances]
    found += [Component(f"backend:{b.name}", b.instance.host, b.instance.port, b.module)
              for b in config.backends]
    if config.console.enabled:
        found += [Component("console", i.host, i.port, "gateway.console") for i in config.console.instances]
    if config.policy.engine == "opa" and config.policy.opa_url:
        found.append(_url_component("opa", config.policy.opa_url, 8181))
    if config.rate_limits.backend == "redis" and config.rate_limits.redis_url:
        found.append(_url_component("redis", config.rate_limits.redis_url, 6379))
    return found


def _url_component(role: str, url: str, default_port: int) -> Component:
    parts = urlsplit(url)
    assert parts.hostname, url
    return Component(role, parts.hostname, parts.port or default_port, None)


def envoy_endpoints(envoy: dict[str, Any]) -> set[tuple[str, str, int]]:
    """(cluster, host, port) of every socket address the rendered Envoy config sends to."""
    return {(c["name"], lb["endpoint"]["address"]["socket_address"]["address"],
             lb["endpoint"]["address"]["socket_address"]["port_value"])
            for c in envoy["static_resources"]["clusters"]
            for group in c.get("load_assignment", {}).get("endpoints", [])
            for lb in group["lb_endpoints"]}


def http_filters(envoy: dict[str, Any], listener: str) -> list[dict[str, Any]]:
    (found,) = [li for li in envoy["static_resources"]["listeners"] if li["name"] == listener]
    return [f for chain in found["filter_chains"] for net in chain["filters"]
            for f in net["typed_config"].get("http_filters", [])]


def assert_ext_proc_wired(envoy: dict[str, Any], config: GatewayConfig) -> None:
    """The ext_proc filter sits on the public listener, fails closed, and calls a cluster whose
    endpoints are the configured ext_proc instances."""
    filters = {f["name"]: f["typed_config"] for f in http_filters(envoy, "mcp_gateway_https")}
    assert "envoy.filters.http.ext_proc" in filters, "Envoy renders without ext_proc"
    ext_proc = filters["envoy.filters.http.ext_proc"]
    assert ext_proc.get("failure_mode_allow", False) is False
    cluster = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    endpoints = {(h, p) for c, h, p in envoy_endpoints(envoy) if c == cluster}
    assert endpoints == {(i.host, i.port) for i in config.ext_proc.instances}


# Kubernetes


def k8s_documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def k8s_envoy() -> dict[str, Any]:
    (cm,) = [d for d in k8s_documents()
             if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-config"]
    loaded: dict[str, Any] = yaml.safe_load(cm["data"]["envoy.yaml"])
    return loaded


def k8s_service_name(host: str) -> str | None:
    """The Service a host names in the gateway's namespace; None for a host outside the cluster
    or in another namespace (not deployed by these manifests)."""
    if host.endswith(CLUSTER_SUFFIX):
        return host.removesuffix(CLUSTER_SUFFIX)
    if host.endswith(".svc.cluster.local") or "." in host:
        return None
    return host


def k8s_backing(service: dict[str, Any], port: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(workload, container, container port) behind ``port`` of ``service``; fails when none."""
    name = service["metadata"]["name"]
    spec = service["spec"]
    (svc_port,) = [p for p in spec["ports"] if p["port"] == port] or [None]
    assert svc_port is not None, f"Service {name} has no port {port}"
    selector = spec.get("selector") or {}
    assert selector, f"Service {name} selects no pods"
    matches = []
    for doc in k8s_documents():
        if doc["kind"] not in WORKLOAD_KINDS or doc["metadata"]["namespace"] != NAMESPACE:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        if selector.items() <= labels.items():
            matches.append(doc)
    assert len(matches) == 1, f"Service {name} selects {len(matches)} workloads"
    (workload,) = matches
    target = svc_port.get("targetPort", port)
    for container in workload["spec"]["template"]["spec"]["containers"]:
        for cport in container.get("ports", []):
            if target in (cport["containerPort"], cport.get("name")):
                return workload, container, cport["containerPort"]
    raise AssertionError(f"Service {name} port {port} -> {target}: no container of "
                         f"{workload['kind']} {workload['metadata']['name']} exposes it")


def argument(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def test_every_component_of_the_k8s_gateway_config_has_a_workload() -> None:
    """ext_authz, ext_proc, each server, OPA and Redis named in deploy/k8s/gateway.yaml: a Service
    with that port, backed by one workload whose container listens there and runs the module."""
    config = load_config(K8S / "gateway.yaml")
    services = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Service"}
    roles = set()
    for comp in components(config):
        name = k8s_service_name(comp.host)
        if name is None:
            continue
        roles.add(comp.role.split(":")[0])
        assert name in services, f"{comp.role}: gateway.yaml names {comp.host}, no Service {name}"
        workload, container, container_port = k8s_backing(services[name], comp.port)
        if comp.module is not None:
            argv = [*container.get("command", []), *container.get("args", [])]
            assert argument(argv, "-m") == comp.module, f"{comp.role}: {workload['metadata']['name']}"
            assert argument(argv, "--port") == str(container_port), comp.role
    assert {"ext_authz", "ext_proc", "server", "opa", "redis"} <= roles


def test_every_k8s_envoy_endpoint_has_a_workload() -> None:
    """Each in-namespace address of the rendered Envoy config is a Service with a workload; the
    others are outside the cluster (identity provider) or in another namespace (collector)."""
    services = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Service"}
    endpoints = envoy_endpoints(k8s_envoy())
    assert endpoints
    for cluster, host, port in endpoints:
        name = k8s_service_name(host)
        if name is None:
            continue
        assert name in services, f"Envoy cluster {cluster} sends to {host}, no Service {name}"
        k8s_backing(services[name], port)


def test_k8s_envoy_renders_ext_proc() -> None:
    """The Envoy ConfigMap has the ext_proc filter and its cluster, aimed at the ext-proc Service
    (without them list filtering and PII masking are silently off)."""
    assert_ext_proc_wired(k8s_envoy(), load_config(K8S / "gateway.yaml"))


def test_envoy_reaches_python_services_over_headless_services() -> None:
    """Envoy load-balances over pod IPs (STRICT_DNS on a headless Service): the ext_authz, ext_proc
    and server Services have no cluster IP, so every ready pod takes traffic."""
    config = load_config(K8S / "gateway.yaml")
    services = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Service"}
    for comp in components(config):
        name = k8s_service_name(comp.host)
        if name is None or comp.role in ("opa", "redis"):
            continue
        assert name in services, f"{comp.role}: no Service {name}"
        assert services[name]["spec"].get("clusterIP") == "None", comp.role


# docker compose


def compose_services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, dict[str, Any]] = loaded["services"]
    return result


def compose_ports(service: dict[str, Any]) -> set[int]:
    """The ports a compose service listens on: --port / --addr in its command, the collector's
    receivers, else the image's default."""
    command = [str(a) for a in service.get("command", [])]
    if "--port" in command:
        return {int(argument(command, "--port"))}
    for arg in command:
        if arg.startswith("--addr="):
            return {int(arg.rsplit(":", 1)[1])}
    image = service["image"].partition(":")[0]
    if image == "otel/opentelemetry-collector-contrib":
        collector: dict[str, Any] = yaml.safe_load(COMPOSE_COLLECTOR.read_text())
        return {int(p["endpoint"].rsplit(":", 1)[1])
                for r in collector["receivers"].values() for p in r["protocols"].values()}
    assert image in IMAGE_DEFAULT_PORTS, f"no listening port known for {service['image']}"
    return {IMAGE_DEFAULT_PORTS[image]}


def test_every_component_of_the_compose_gateway_config_has_a_service() -> None:
    """Every host deploy/compose/gateway.yaml names is a compose service listening on that port
    (and running that module, for ours)."""
    config = load_config(COMPOSE_GATEWAY)
    services = compose_services()
    for comp in components(config):
        assert comp.host in services, f"{comp.role}: gateway.yaml names {comp.host}, not a compose service"
        service = services[comp.host]
        assert comp.port in compose_ports(service), comp.role
        if comp.module is not None:
            assert argument([str(a) for a in service["command"]], "-m") == comp.module, comp.role
    assert {c.role for c in components(config)} >= {"ext_authz", "ext_proc", "console", "opa", "redis"}


def test_every_compose_envoy_endpoint_is_a_service() -> None:
    """Each address of the mounted Envoy config is a compose service (or outside: the IdP)."""
    services = compose_services()
    envoy: dict[str, Any] = yaml.safe_load(COMPOSE_ENVOY.read_text())
    for cluster, host, port in envoy_endpoints(envoy):
        if "." in host:
            continue  # a DNS name outside the compose network
        assert host in services, f"Envoy cluster {cluster} sends to {host}, not a compose service"
        assert port in compose_ports(services[host]), cluster
    assert_ext_proc_wired(envoy, load_config(COMPOSE_GATEWAY))


@pytest.mark.parametrize("host, expected", [
    ("ext-proc.mcp-gateway.svc.cluster.local", "ext-proc"), ("redis", "redis"),
    ("otel-collector.observability.svc.cluster.local", None), ("idp.example.com", None)])
def test_k8s_service_name(host: str, expected: str | None) -> None:
    """Hosts in the gateway's namespace (or bare) map to a Service; others are not deployed here."""
    assert k8s_service_name(host) == expected
