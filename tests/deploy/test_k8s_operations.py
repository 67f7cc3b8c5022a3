"""Kubernetes day-2 behaviour, checked statically: config changes roll the pods that read them,
Envoy's memory limit sits above its overload manager's heap, evictions keep replicas serving,
replicas spread over nodes, and Envoy drains before it stops."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import trustme
import yaml

from gateway.assertion import KeyRing, new_private_jwk
from gateway.config import load_config
from gateway.service import SHUTDOWN_GRACE_SECONDS
from gatewayctl.envoy_config import validate
from mcp_servers.core.settings import ServerSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# ConfigMaps whose readers load them only at start, so a change must roll them. opa-policies is
# not among them: OPA keeps its policies until restarted (README.md, "Rolling out changes").
ROLLED_CONFIGMAPS = {"mcp-gateway-config", "envoy-config"}
# What Envoy needs above its heap (binary, thread stacks, allocator overhead): the limit must be
# at least this multiple of the overload manager's max_heap_size_bytes.
HEAP_HEADROOM = 1.25
QUANTITY = re.compile(r"^(?P<n>\d+)(?P<unit>Ki|Mi|Gi|k|M|G)?$")
UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6, "G": 10**9}


def documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def workloads() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")}


def configmap_files() -> dict[str, str]:
    """ConfigMap name -> text of the file that defines it."""
    found = {}
    for path in sorted(K8S.glob("configmap-*.yaml")):
        (doc,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
        found[doc["metadata"]["name"]] = path.read_text()
    return found


def renderer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_configmaps", K8S / "render_configmaps.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantity(text: str) -> int:
    match = QUANTITY.match(str(text))
    assert match, f"unexpected quantity {text}"
    return int(match["n"]) * UNITS[match["unit"]]


def envoy_pod() -> dict[str, Any]:
    spec: dict[str, Any] = workloads()["envoy"]["spec"]["template"]["spec"]
    return spec


def test_configmaps_are_mounted_as_folders() -> None:
    """No ConfigMap is mounted through subPath (such a mount never sees an update)."""
    for name, workload in workloads().items():
        spec = workload["spec"]["template"]["spec"]
        configmaps = {v["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] in configmaps:
                    assert "subPath" not in mount and "subPathExpr" not in mount, f"{name}: {mount}"


def test_pods_roll_when_the_config_they_read_changes() -> None:
    """Each workload mounting the gateway or Envoy ConfigMap carries checksum/<name> on its pod
    template, equal to the hash of the checked-in ConfigMap; a changed ConfigMap changes it."""
    files = configmap_files()
    render = renderer()
    for name, workload in workloads().items():
        template = workload["spec"]["template"]
        mounted = {v["configMap"]["name"] for v in template["spec"].get("volumes", []) if "configMap" in v}
        annotations = template["metadata"].get("annotations", {})
        for configmap in mounted & ROLLED_CONFIGMAPS:
            assert annotations.get(f"checksum/{configmap}") == render.checksum(files[configmap]), \
                f"{name}: stale or missing checksum/{configmap} (run render_configmaps.py)"
    line = '        checksum/envoy-config: "0"\n'
    assert render.annotated(line, files) != render.annotated(line, {**files, "envoy-config": "changed"})


def test_envoy_memory_limit_is_above_the_overload_heap() -> None:
    """The container's memory limit exceeds the overload manager's heap (with headroom), so Envoy
    sheds load (shrink heap, stop accepting) before the kernel kills it."""
    (configmap,) = [d for d in documents()
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-config"]
    bootstrap = yaml.safe_load(configmap["data"]["envoy.yaml"])
    (heap,) = [m["typed_config"]["max_heap_size_bytes"]
               for m in bootstrap["overload_manager"]["resource_monitors"]
               if m["name"] == "envoy.resource_monitors.fixed_heap"]
    resources = envoy_pod()["containers"][0]["resources"]
    limit = quantity(resources["limits"]["memory"])
    assert limit >= heap * HEAP_HEADROOM, f"limit {limit} vs heap {heap}"
    assert quantity(resources["requests"]["memory"]) <= limit


def test_every_scaled_component_has_a_disruption_budget() -> None:
    """Each workload with 2+ replicas has one PodDisruptionBudget selecting its pods that lets at
    most one go at a time; single-replica ones have none (it would block node drains)."""
    budgets = [d for d in documents() if d["kind"] == "PodDisruptionBudget"]
    for name, workload in workloads().items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        if workload["spec"]["replicas"] < 2:
            assert not mine, name
            continue
        assert len(mine) == 1, f"{name}: {len(mine)} disruption budgets"
        spec = mine[0]["spec"]
        replicas = workload["spec"]["replicas"]
        assert spec.get("maxUnavailable") == 1 or 1 <= spec.get("minAvailable", 0) < replicas, name
    assert {"envoy", "ext-authz", "ext-proc"} <= {b["metadata"]["name"] for b in budgets}


def test_replicas_spread_over_nodes() -> None:
    """Each workload with 2+ replicas asks the scheduler to spread its pods over nodes."""
    for name, workload in workloads().items():
        if workload["spec"]["replicas"] < 2:
            continue
        labels = workload["spec"]["template"]["metadata"]["labels"]
        spreads = workload["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
        assert any(s["topologyKey"] == "kubernetes.io/hostname"
                   and s["labelSelector"]["matchLabels"].items() <= labels.items() for s in spreads), name


def test_envoy_drains_before_it_stops() -> None:
    """preStop starts a graceful drain on Envoy's admin address (from the gateway config) and
    waits; the drain lasts no longer than that wait, which ends before the grace period: open
    streams (SSE) get the whole wait, and SIGTERM comes from the hook, not the deadline."""
    config = load_config(K8S / "gateway.yaml")
    spec = envoy_pod()
    container = spec["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/bash", "-c"]
    script = command[2]
    assert f"/dev/tcp/{config.admin.host}/{config.admin.port}" in script
    assert "POST /drain_listeners?graceful " in script
    sleep = int(shlex.split(script.rsplit(";", 1)[1])[1])
    args = container["args"]
    assert int(args[args.index("--drain-time-s") + 1]) <= sleep
    assert args[args.index("--drain-strategy") + 1] == "immediate"
    assert sleep + 10 <= spec["terminationGracePeriodSeconds"]


def test_traces_and_metrics_reach_the_observability_stack() -> None:
    """The gateway config has a telemetry block: every Python pod's OTEL_EXPORTER_OTLP_ENDPOINT is
    its otlp_endpoint; ext_authz / ext_proc expose /metrics on port + offset on every interface,
    and Envoy its stats listener."""
    config = load_config(K8S / "gateway.yaml")
    telemetry = config.telemetry
    assert telemetry.otlp_endpoint and telemetry.metrics_host == "0.0.0.0"
    python = {n: w for n, w in workloads().items()
              if w["spec"]["template"]["spec"]["containers"][0]["image"].startswith("mcp-gateway:")}
    assert {"ext-authz", "ext-proc"} <= set(python)
    for name, workload in python.items():
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == telemetry.otlp_endpoint, name
    for name, service in (("ext-authz", config.ext_authz), ("ext-proc", config.ext_proc)):
        container = workloads()[name]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["containerPort"] for p in container["ports"]}
        assert service.instances[0].port + telemetry.metrics_port_offset in ports, name
    envoy_ports = {p["containerPort"] for p in envoy_pod()["containers"][0]["ports"]}
    assert telemetry.envoy_stats_port in envoy_ports


def test_rendered_envoy_config_validates(tmp_path: Path) -> None:
    """The real Envoy accepts the ConfigMap's config (ext_proc, tracing, stats listener), with
    test certificates at its TLS paths."""
    (configmap,) = [d for d in documents()
                    if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "envoy-config"]
    # The pod's folders here: the ConfigMap (envoy.yaml and its SDS files), the edge Secret and
    # the inner_tls Secret, with test certificates in the files cert-manager would write.
    folders = {"/etc/envoy/config": tmp_path / "config", "/etc/envoy/tls": tmp_path / "tls",
               "/etc/envoy/inner": tmp_path / "inner",
               "/etc/mcp-gateway/assertion-jwks": tmp_path / "assertion-jwks"}
    for folder in folders.values():
        folder.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    for cert, key in (("tls/server.pem", "tls/server.key"), ("inner/tls.crt", "inner/tls.key")):
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / cert))
        leaf.private_key_pem.write_to_path(str(tmp_path / key))
    ca.cert_pem.write_to_path(str(tmp_path / "inner/ca.crt"))
    # The operator's ConfigMap mcp-gateway-assertion-jwks (identity.jwks_file), which Envoy serves.
    jwks = KeyRing.from_jwks({"keys": [new_private_jwk()]}).public_jwks()
    (tmp_path / "assertion-jwks/assertion-jwks.json").write_bytes(orjson.dumps(jwks))

    def here(text: str) -> str:
        for mounted, local in folders.items():
            text = text.replace(mounted, str(local))
        return text

    for name, content in configmap["data"].items():
        (folders["/etc/envoy/config"] / name).write_text(here(content))
    text = (folders["/etc/envoy/config"] / "envoy.yaml").read_text()
    target = tmp_path / "envoy.yaml"
    target.write_text(text)
    validate(target)


# Envoy refreshes a STRICT_DNS cluster every 5 s (its default) and the cluster DNS caches an
# answer up to its TTL (5 s in CoreDNS's kubernetes plugin): how long a terminating pod may still
# get new calls.
ENDPOINT_PROPAGATION_SECONDS = 10
# How long each process's own drain may take after SIGTERM: the gRPC services' grace, the
# servers' --shutdown-timeout default.
OWN_DRAIN_SECONDS = {"ext-authz": SHUTDOWN_GRACE_SECONDS, "ext-proc": SHUTDOWN_GRACE_SECONDS,
                     "files": ServerSettings().shutdown_timeout,
                     "database": ServerSettings().shutdown_timeout}


def test_python_services_keep_serving_until_envoy_stops_calling() -> None:
    """ext_authz, ext_proc and each server sleep in preStop at least as long as Envoy may still
    send them calls, and the grace period covers the sleep plus the process's own drain."""
    for name, own_drain in OWN_DRAIN_SECONDS.items():
        spec = workloads()[name]["spec"]["template"]["spec"]
        command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        sleep = int(command[1])
        argv = spec["containers"][0]["command"]
        assert "--shutdown-timeout" not in argv, f"{name}: the drain budget assumes the default"
        assert sleep >= ENDPOINT_PROPAGATION_SECONDS, name
        assert sleep + own_drain < spec.get("terminationGracePeriodSeconds", 30), name


def test_stream_carriers_scale_down_slowly() -> None:
    """Envoy and ext_proc carry long streams: each has an HPA (2+ replicas) whose scale-down waits
    out a stabilization window and removes one pod at a time."""
    hpas = {d["metadata"]["name"]: d["spec"] for d in documents() if d["kind"] == "HorizontalPodAutoscaler"}
    for name in ("envoy", "ext-proc"):
        spec = hpas[name]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert spec["minReplicas"] >= 2
        down = spec["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300, name
        assert all(p["type"] == "Pods" and p["value"] == 1 for p in down["policies"]), name
