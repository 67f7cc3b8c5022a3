"""docker-compose.yml, operations: health checks gate Envoy's start, every service has a memory
limit (Envoy's above its overload heap), and the audit trail and the tool catalog live in named
volumes (one catalog for every ext_authz and ext_proc, one audit volume per writer)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GATEWAY = REPO / "deploy" / "compose" / "gateway.yaml"
ENVOY = REPO / "deploy" / "compose" / "envoy.yaml"
HEAP_HEADROOM = 1.25  # as for Kubernetes (tests/deploy/test_k8s_operations.py)
SIZE = re.compile(r"^(?P<n>\d+)(?P<unit>[kKmMgG]?)[bB]?$")
# Third-party services that run without a health check: their images have no shell or client to
# run one with (OPA, the collector: distroless), or nothing waits on them (the UI services).
UNCHECKED = {"opa", "otel-collector", "jaeger", "prometheus", "grafana", "state-init", "pki-init"}
# The one-shot services of the gateway image (they run to completion before the others start).
ONE_SHOT = ("state-init", "pki-init")
# Named volumes pki-init fills and owns (one component's inner TLS pair, the caller assertion's
# key and JWKS: tests/deploy/test_compose_inner_tls.py).
# Volumes pki-init (not state-init) hands to their users.
PKI_VOLUMES = ("inner-tls-", "assertion-", "audit-keys", "workflow-delegation", "workflow-jwks", "edge-ca")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    result: dict[str, dict[str, Any]] = loaded["services"]
    return result


def size(text: str) -> int:
    match = SIZE.match(str(text))
    assert match, f"unexpected size {text}"
    return int(match["n"]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match["unit"].lower()]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def gateway_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if "build" in s and n not in ONE_SHOT}


def test_gateway_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    """Each gateway process, Envoy and Redis has a health check that probes the port it serves
    on: under inner_tls (ports that admit only the callers' client certificates) ext_authz,
    ext_proc, the servers and the aggregators by a TCP connect to their port, Envoy on its admin
    /ready."""
    config = load_config(GATEWAY)
    for name, service in services.items():
        if name in UNCHECKED:
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
        assert check["test"][0] == "CMD", name
    assert config.inner_tls.enabled
    for inst in (*config.ext_authz.instances, *config.ext_proc.instances, *config.aggregate.instances,
                 *(i for s in config.servers for i in s.instances)):
        test = services[inst.host]["healthcheck"]["test"]
        assert test[4] == str(inst.port) and "socket.create_connection(('127.0.0.1'" in test[3], inst.host
    envoy_check = " ".join(services["envoy"]["healthcheck"]["test"])
    assert f"/dev/tcp/{config.admin.host}/{config.admin.port}" in envoy_check and "GET /ready" in envoy_check


def test_envoy_starts_once_what_it_routes_to_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    """Envoy waits for every ext_authz, ext_proc and server instance to pass its health check."""
    config = load_config(GATEWAY)
    depends = services["envoy"]["depends_on"]
    hosts = {i.host for i in (*config.ext_authz.instances, *config.ext_proc.instances)}
    hosts |= {i.host for s in config.servers for i in s.instances}
    for host in hosts:
        assert depends[host] == {"condition": "service_healthy"}, host


def test_every_service_has_a_memory_limit(services: dict[str, dict[str, Any]]) -> None:
    """Each long-running service has deploy.resources.limits.memory."""
    for name, service in services.items():
        if name in {"jaeger", "prometheus", "grafana", "otel-collector"}:
            continue  # the optional observability stack: sized by whoever runs it
        limit = service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
        assert limit, name
        size(limit)


def test_envoy_memory_limit_is_above_the_overload_heap(services: dict[str, dict[str, Any]]) -> None:
    """Envoy's limit exceeds the overload manager's heap (with headroom), so it sheds load first."""
    bootstrap = yaml.safe_load(ENVOY.read_text())
    (heap,) = [m["typed_config"]["max_heap_size_bytes"]
               for m in bootstrap["overload_manager"]["resource_monitors"]
               if m["name"] == "envoy.resource_monitors.fixed_heap"]
    limit = size(services["envoy"]["deploy"]["resources"]["limits"]["memory"])
    assert limit >= heap * HEAP_HEADROOM, f"limit {limit} vs heap {heap}"


def test_state_is_not_on_tmpfs() -> None:
    """The compose gateway config puts the audit folder, the catalog and state_dir off /tmp (a
    tmpfs in every gateway container)."""
    config = load_config(GATEWAY)
    for path in (config.audit.dir, config.catalog.path, config.state_dir):
        assert PurePosixPath("/tmp") not in [PurePosixPath(path), *PurePosixPath(path).parents], path


def test_one_catalog_volume_for_every_ext_authz_and_ext_proc(services: dict[str, dict[str, Any]]) -> None:
    """Every ext_authz and ext_proc mounts the same named volume at the catalog's folder."""
    config = load_config(GATEWAY)
    folder = str(PurePosixPath(config.catalog.path).parent)
    declared = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    sources = {mounts(services[i.host]).get(folder)
               for i in (*config.ext_authz.instances, *config.ext_proc.instances)}
    assert len(sources) == 1, f"different catalogs: {sources}"
    (source,) = sources
    assert source in declared


def test_each_audit_writer_has_its_own_volume(services: dict[str, dict[str, Any]]) -> None:
    """ext_authz and every server instance mount a named volume of their own at the audit folder
    (writers of one name would collide: each locks <service>-<port>.jsonl); the servers are
    started with --audit-file there."""
    config = load_config(GATEWAY)
    declared = set(yaml.safe_load(COMPOSE.read_text())["volumes"])
    writers = [i.host for i in config.ext_authz.instances]
    writers += [i.host for s in config.servers for i in s.instances]
    seen = {}
    for host in writers:
        source = mounts(services[host]).get(config.audit.dir)
        assert source in declared, f"{host}: audit folder not on a named volume"
        seen[host] = source
    assert len(set(seen.values())) == len(writers), f"audit volumes shared: {seen}"
    for server in config.servers:
        for instance in server.instances:
            command = services[instance.host]["command"]
            expected = str(PurePosixPath(config.audit.dir) / f"{server.name}-{instance.port}.jsonl")
            assert command[command.index("--audit-file") + 1] == expected, instance.host


def test_state_volumes_are_handed_to_the_image_user(services: dict[str, dict[str, Any]]) -> None:
    """A one-shot root service chowns every state volume to the image's user before any gateway
    process starts (fresh named volumes belong to root; the processes run as 10001)."""
    init = services["state-init"]
    assert init["user"] == "0:0" and init["command"][:2] == ["chown", "10001:10001"]
    targets = mounts(init)
    owned = {targets[path] for path in init["command"][2:]}
    used = {source for s in gateway_services(services).values()
            for source in mounts(s).values() if not source.startswith((".", "/", "$", *PKI_VOLUMES))}
    assert used and used <= owned
    for name, service in gateway_services(services).items():
        if any(not src.startswith((".", "/", "$", *PKI_VOLUMES)) for src in mounts(service).values()):
            done = {"condition": "service_completed_successfully"}
            assert service["depends_on"]["state-init"] == done, name


def test_compose_secret_files_are_ignored_by_git() -> None:
    """The .env files compose reads its secrets from (next to docker-compose.yml, or in
    deploy/compose/) are ignored by git, so a secret is never committed by accident."""
    paths = [".env", "deploy/compose/.env"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO,  # noqa: S607
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.stdout.split() == paths
