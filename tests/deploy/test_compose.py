"""docker-compose.yml checked statically (no Docker engine here): services, mounts, ports, and the
Envoy config it mounts, which must be current and accepted by the real Envoy binary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.config import load_config, parse_config
from gateway.envoy_config import RenderOptions, render, validate

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
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
    """Each bind-mounted path is in the repo (TLS comes from an env-overridable folder)."""
    for name, svc in services(compose).items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0] if not volume.startswith("${") else volume[:volume.index("}") + 1]
            env = ENV_MOUNT.match(source)
            if env:
                assert env["var"] == "MCP_GATEWAY_TLS_DIR", f"{name}: unexpected env mount {source}"
                continue
            assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    """Third-party images carry an explicit version tag (never `latest`)."""
    required = {"envoyproxy/envoy", "openpolicyagent/opa", "redis", "otel/opentelemetry-collector-contrib",
                "jaegertracing/all-in-one", "prom/prometheus"}
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
    assert svcs["envoy"]["ports"] == [f"443:{config.listen.port}"]
    instances = [*config.ext_authz.instances]
    for server in config.servers:
        instances += server.instances
    for inst in instances:
        assert inst.host in svcs, f"config names {inst.host}, which is not a compose service"
        command = svcs[inst.host]["command"]
        assert command[command.index("--port") + 1] == str(inst.port)
    assert config.policy.opa_url == "http://opa:8181" and "opa" in svcs
    assert config.rate_limits.redis_url and "//redis:" in config.rate_limits.redis_url
    opa = svcs["opa"]
    assert "./policies:/policies:ro" in opa["volumes"] and "/policies" in opa["command"]


def test_envoy_mounts_the_rendered_config(compose: dict[str, Any]) -> None:
    """The compose Envoy mounts deploy/compose/envoy.yaml, which is what the gateway config renders to."""
    assert "./deploy/compose/envoy.yaml:/etc/envoy/envoy.yaml:ro" in services(compose)["envoy"]["volumes"]
    config = parse_config(yaml.safe_load(GATEWAY.read_text()), base_dir=GATEWAY.parent,
                          source="deploy/compose/gateway.yaml")
    expected = render(config, RenderOptions(relative_to=REPO))
    assert ENVOY.read_text() == expected, ("stale: mcp-gateway --config deploy/compose/gateway.yaml "
                                           "config render --ext-proc off -o deploy/compose/envoy.yaml")


def test_mounted_envoy_config_validates(tmp_path: Path) -> None:
    """The real Envoy accepts the mounted config (with test certificates at its TLS paths)."""
    config = load_config(GATEWAY)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    text = ENVOY.read_text().replace(config.tls.cert_file, str(cert)).replace(config.tls.key_file, str(key))
    target = tmp_path / "envoy.yaml"
    target.write_text(text)
    validate(target)
