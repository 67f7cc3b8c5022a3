"""docker-compose.yml checked statically (no Docker engine here): services, mounts, ports, and the
Envoy config it mounts, which must be current and accepted by the real Envoy binary."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from prometheus_client import Counter, Gauge, Histogram

from gateway.config import load_config, parse_config
from gateway.telemetry import metrics
from gatewayctl import compose_init
from gatewayctl.devstack.credentials import inner_identities
from gatewayctl.envoy_config import RenderOptions, render, validate, write_sds_documents

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
PROMETHEUS = REPO / "deploy" / "compose" / "prometheus.yml"
COLLECTOR = REPO / "deploy" / "compose" / "otel-collector.yaml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mcp-gateway.json"
RENDER = ("mcp-gateway --config deploy/compose/gateway.yaml config render --ext-proc on --relative-to . "
          "-o deploy/compose/envoy.yaml")
# Mounts that are created outside the repo on purpose (TLS material is never committed).
ENV_MOUNT = re.compile(r"^\$\{(?P<var>\w+):-(?P<default>[^}]+)\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def test_depends_on_names_existing_services(compose: dict[str, Any]) -> None:
    """Every depends_on entry is a service defined in the file."""
    names = set(services(compose))
    for name, svc in services(compose).items():
        for dep in svc.get("depends_on", []):
            assert dep in names, f"{name} depends on unknown service {dep}"


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    """Each bind-mounted path is in the repo (TLS comes from an env-overridable folder); each
    other mount is a named volume the file declares."""
    named = set(compose.get("volumes") or {})
    for name, svc in services(compose).items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if not volume.startswith("${") else volume[:volume.index("}") + 1]
            if not source.startswith((".", "/", "$")):
                assert source in named, f"{name} mounts undeclared volume {source}"
                continue
            env = ENV_MOUNT.match(source)
            if env:
                assert env["var"] == "MCP_GATEWAY_TLS_DIR", f"{name}: unexpected env mount {source}"
                continue
            assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    """Third-party images carry an explicit version tag (never `latest`)."""
    required = {"envoyproxy/envoy", "openpolicyagent/opa", "redis", "otel/opentelemetry-collector-contrib",
                "jaegertracing/all-in-one", "prom/prometheus", "grafana/grafana"}
    seen = set()
    for svc in services(compose).values():
        image, _, tag = svc["image"].partition(":")
        seen.add(image)
        assert tag and tag != "latest", svc["image"]
    assert required <= seen
    assert any("build" in svc for svc in services(compose).values()), "the project image is built here"


def test_ports_agree_with_the_gateway_config(compose: dict[str, Any]) -> None:
    """Envoy publishes 443 to the configured listen port; every configured instance is a compose
    service whose command listens on the configured port; OPA and Redis URLs point at services."""
    config = load_config(GATEWAY)
    svcs = services(compose)
    assert svcs["envoy"]["ports"] == [f"${{GATEWAY_BIND:-127.0.0.1}}:443:{config.listen.port}"]
    instances = [*config.ext_authz.instances, *config.ext_proc.instances]
    for server in config.servers:
        instances += server.instances
    for inst in instances:
        assert inst.host in svcs, f"config names {inst.host}, which is not a compose service"
        command = svcs[inst.host]["command"]
        assert command[command.index("--port") + 1] == str(inst.port)
    assert config.policy.opa_url == "http://opa:8181" and "opa" in svcs
    assert config.rate_limits.redis_url and "@redis:6379/" in config.rate_limits.redis_url
    opa = svcs["opa"]
    assert "./policies:/policies:ro" in opa["volumes"] and "/policies" in opa["command"]


def test_envoy_mounts_the_rendered_config(compose: dict[str, Any]) -> None:
    """The compose Envoy mounts deploy/compose/envoy.yaml, which is what the gateway config renders to."""
    assert "./deploy/compose/envoy.yaml:/etc/envoy/envoy.yaml:ro" in services(compose)["envoy"]["volumes"]
    config = parse_config(yaml.safe_load(GATEWAY.read_text()), base_dir=GATEWAY.parent,
                          source="deploy/compose/gateway.yaml")
    expected = render(config, RenderOptions(ext_proc=True, relative_to=REPO))
    assert ENVOY.read_text() == expected, f"stale: {RENDER}"


def test_envoy_workers_are_bounded(compose: dict[str, Any]) -> None:
    """Envoy gets a fixed worker count (default 2) instead of one worker per host CPU."""
    command = services(compose)["envoy"]["command"]
    assert command[command.index("--concurrency") + 1] == "${MCP_GATEWAY_ENVOY_WORKERS:-2}"


def test_mounted_envoy_config_validates(tmp_path: Path) -> None:
    """The real Envoy accepts the mounted config (with test certificates at its TLS paths, and the
    inner pair pki-init issues read through SDS files naming them)."""
    config = load_config(GATEWAY)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    out = tmp_path / "out"
    for identity in (*inner_identities(config), compose_init.SCRAPER):
        (out / identity).mkdir(parents=True)
    # The caller assertion's key and JWKS (volumes in compose) under tmp_path.
    relocated = tmp_path / "gateway.yaml"
    relocated.write_text(GATEWAY.read_text().replace("/etc/mcp-gateway/assertion-", f"{tmp_path}/assertion-")
                         .replace("/etc/mcp-gateway/audit-keys", f"{tmp_path}/audit-keys"))
    for folder in ("assertion-keys", "assertion-jwks", "audit-keys"):
        (tmp_path / folder).mkdir()
    assert compose_init.main(["--config", str(relocated), "--pki", str(tmp_path / "pki"),
                              "--out", str(out), "--uid", str(os.geteuid()),
                              "--envoy-uid", str(os.geteuid())]) == 0
    envoy_dir, sds = out / "envoy", tmp_path / "sds"
    write_sds_documents(replace(config, inner_tls=replace(
        config.inner_tls, cert_file=str(envoy_dir / "tls.crt"), key_file=str(envoy_dir / "tls.key"),
        ca_file=str(envoy_dir / "ca.crt"), sds_dir=str(sds))))
    text = ENVOY.read_text().replace(config.tls.cert_file, str(cert)).replace(config.tls.key_file, str(key))
    text = text.replace(f'"{config.inner_tls.sds_dir}/', f'"{sds}/')
    text = text.replace(config.identity.jwks_file, str(tmp_path / "assertion-jwks" / "assertion-jwks.json"))
    target = tmp_path / "envoy.yaml"
    target.write_text(text)
    validate(target)


def test_admin_stays_private_and_stats_are_published_to_prometheus(compose: dict[str, Any]) -> None:
    """Envoy's admin port is loopback and unpublished; Prometheus reaches Envoy through the stats
    listener, and the Python services bind their /metrics where other containers reach them."""
    config = load_config(GATEWAY)
    assert config.admin.host == "127.0.0.1"
    assert services(compose)["envoy"]["ports"] == [f"${{GATEWAY_BIND:-127.0.0.1}}:443:{config.listen.port}"]
    assert config.telemetry.envoy_stats_port is not None and config.listen.host == "0.0.0.0"
    assert config.telemetry.metrics_host == "0.0.0.0"
    rendered = yaml.safe_load(ENVOY.read_text())
    stats = next(li for li in rendered["static_resources"]["listeners"] if li["name"] == "prometheus_stats")
    assert stats["address"]["socket_address"]["port_value"] == config.telemetry.envoy_stats_port
    hcm = stats["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    proxied = [r for r in routes if "route" in r]
    assert [r["match"]["path"] for r in proxied] == ["/stats/prometheus"]


def scrape_targets() -> dict[str, tuple[str, list[str]]]:
    """job name -> (metrics path, targets) of deploy/compose/prometheus.yml."""
    loaded: dict[str, Any] = yaml.safe_load(PROMETHEUS.read_text())
    return {job["job_name"]: (job.get("metrics_path", "/metrics"),
                              [t for sc in job["static_configs"] for t in sc["targets"]])
            for job in loaded["scrape_configs"]}


def test_prometheus_scrapes_every_process(compose: dict[str, Any]) -> None:
    """Every scrape target is a compose service on the port it serves metrics on, and every
    ext_authz, ext_proc, MCP server and aggregator instance, Envoy and the collector are scraped."""
    config = load_config(GATEWAY)
    offset = config.telemetry.metrics_port_offset
    expected = {("/stats/prometheus", f"envoy:{config.telemetry.envoy_stats_port}")}
    expected |= {("/metrics", f"{i.host}:{i.port + offset}")
                 for i in (*config.ext_authz.instances, *config.ext_proc.instances)}
    expected |= {("/metrics", f"{i.host}:{i.port}") for server in config.servers for i in server.instances}
    if config.aggregate.enabled:
        expected |= {("/metrics", f"{i.host}:{i.port}") for i in config.aggregate.instances}
    collector: dict[str, Any] = yaml.safe_load(COLLECTOR.read_text())
    collector_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    expected.add(("/metrics", f"otel-collector:{collector_port}"))
    found = {(path, target) for path, targets in scrape_targets().values() for target in targets}
    assert found == expected
    svcs = services(compose)
    for _, target in found:
        assert target.rsplit(":", 1)[0] in svcs, f"{target} is not a compose service"
    mount = "./deploy/compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in svcs["prometheus"]["volumes"]


def test_python_services_export_traces_to_the_collector(compose: dict[str, Any]) -> None:
    """The gateway config and the services' environment send OTLP to the collector's gRPC receiver."""
    config = load_config(GATEWAY)
    collector: dict[str, Any] = yaml.safe_load(COLLECTOR.read_text())
    grpc_port = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert config.telemetry.otlp_endpoint == f"http://otel-collector:{grpc_port}"
    for name, svc in services(compose).items():
        if "build" in svc:
            assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == config.telemetry.otlp_endpoint, name


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    """Grafana mounts the provisioning and dashboard folders; the datasource is the compose
    Prometheus; the dashboard provider reads the mounted folder; every file parses."""
    grafana = services(compose)["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services(compose)["prometheus"]["ports"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/mcp-gateway.yaml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == [dashboards_dir]
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries read."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    # Envoy's label names start with envoy_ too: its series are those followed by a selector.
    pattern = re.compile(r"\b(mcp_gateway_[a-z0-9_]+)\b|\b(envoy_[a-z0-9_]+)\s*[{\[]")
    return {ours or envoy for expr in exprs for ours, envoy in pattern.findall(expr)}


def test_dashboard_queries_name_existing_metrics() -> None:
    """Each mcp_gateway_* series a panel reads is defined in gateway/telemetry/metrics.py (Envoy's
    are checked against a running Envoy in tests/e2e/test_observability_e2e.py); the dashboard
    covers requests, denials, decision latency, top tools and masking."""
    defined = {sample for collector in vars(metrics).values()
               if isinstance(collector, Counter | Gauge | Histogram)
               for family in collector.describe() for sample in _sample_names(family.name, family.type)}
    used = dashboard_metrics()
    ours = {name for name in used if name.startswith("mcp_gateway_")}
    assert ours - defined == set()
    assert {"mcp_gateway_requests_total", "mcp_gateway_decision_duration_seconds_bucket",
            "mcp_gateway_masked_values_total"} <= ours
    assert any(name.startswith("envoy_") for name in used)


def _sample_names(name: str, kind: str) -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {name + suffix for suffix in suffixes[kind]}
