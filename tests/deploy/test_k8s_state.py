"""Kubernetes: the audit trail and the tool catalog live on the shared PersistentVolumeClaim, so
restarts keep them, every pod sees one catalog, and `mcp-gateway catalog approve` run in a pod
(kubectl exec) changes the catalog the gateway uses; each pod writes audit files of its own."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from gateway.config import GatewayConfig, load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CONFIG_MOUNT = "/etc/mcp-gateway"
AUDIT_WRITERS = ("ext-authz", "files", "database")
CATALOG_USERS = ("ext-authz", "ext-proc")


def documents() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "gateway.yaml"
            for d in yaml.safe_load_all(p.read_text()) if d]


def pod(name: str) -> dict[str, Any]:
    (deployment,) = [d for d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def config() -> GatewayConfig:
    return load_config(K8S / "gateway.yaml")


def storage(name: str, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) that holds ``path`` in the first container of Deployment ``name``: the
    mount with the longest mountPath containing it."""
    spec = pod(name)
    target = PurePosixPath(path)
    mounts = [m for m in spec["containers"][0].get("volumeMounts", [])
              if target == PurePosixPath(m["mountPath"]) or PurePosixPath(m["mountPath"]) in target.parents]
    assert mounts, f"{name}: nothing is mounted at {path} (the read-only root filesystem)"
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume, mount


def claim(volume: dict[str, Any]) -> dict[str, Any]:
    assert "persistentVolumeClaim" in volume, f"volume {volume['name']} is not a PersistentVolumeClaim"
    name = volume["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in documents()
              if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == name]
    return pvc


def test_no_state_under_tmp() -> None:
    """The gateway config puts the audit folder, the catalog and state_dir off /tmp."""
    cfg = config()
    for path in (cfg.audit.dir, cfg.catalog.path, cfg.state_dir):
        assert PurePosixPath(path).is_absolute(), path
        assert PurePosixPath("/tmp") not in [PurePosixPath(path), *PurePosixPath(path).parents], path


def test_audit_is_on_the_shared_volume_one_folder_per_pod() -> None:
    """Each audit writer mounts the audit folder from a ReadWriteMany claim (never an emptyDir),
    through a sub-path named after the pod: replicas write files of the same name (the writer
    locks its file, <service>-<port>.jsonl), so each needs a folder of its own."""
    cfg = config()
    for name in AUDIT_WRITERS:
        volume, mount = storage(name, cfg.audit.dir)
        assert mount["mountPath"] == cfg.audit.dir, name
        assert "ReadWriteMany" in claim(volume)["spec"]["accessModes"], name
        assert mount.get("readOnly", False) is False, name
        assert "$(POD_NAME)" in mount.get("subPathExpr", ""), f"{name}: audit folder shared by pods"
        env = {e["name"]: e for e in pod(name)["containers"][0]["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, name


def test_servers_write_their_audit_into_the_audit_folder() -> None:
    """Each module server is started with --audit-file <audit.dir>/<server>-<port>.jsonl, the
    file the dev stack gives it too."""
    cfg = config()
    for server in cfg.servers:
        argv = pod(server.name)["containers"][0]["command"]
        port = argv[argv.index("--port") + 1]
        assert "--audit-file" in argv, server.name
        expected = str(PurePosixPath(cfg.audit.dir) / f"{server.name}-{port}.jsonl")
        assert argv[argv.index("--audit-file") + 1] == expected


def test_one_catalog_for_every_pod() -> None:
    """ext_authz and ext_proc open the catalog from one ReadWriteMany claim at one sub-path (no
    per-pod copy), writable (SQLite writes its WAL and shared-memory files beside it)."""
    cfg = config()
    seen = set()
    for name in CATALOG_USERS:
        volume, mount = storage(name, cfg.catalog.path)
        pvc = claim(volume)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], name
        assert mount.get("readOnly", False) is False, name
        assert "subPathExpr" not in mount, f"{name}: the catalog must not be per pod"
        assert mount["mountPath"] == str(PurePosixPath(cfg.catalog.path).parent), name
        seen.add((pvc["metadata"]["name"], mount.get("subPath", "")))
    assert len(seen) == 1, f"ext_authz and ext_proc open different catalogs: {seen}"


def test_pods_can_write_the_shared_volume() -> None:
    """Pods that mount the claim run with an fsGroup: the volume (and the sub-path folders the
    kubelet creates with its root's mode) is group-writable for the non-root user."""
    for name in {*AUDIT_WRITERS, *CATALOG_USERS}:
        security = pod(name)["securityContext"]
        assert security.get("fsGroup") is not None, name
        assert security["runAsNonRoot"] is True, name


def test_the_cli_in_a_gateway_pod_sees_the_catalog() -> None:
    """`kubectl exec deploy/ext-authz -- mcp-gateway --config /etc/mcp-gateway/gateway.yaml catalog
    approve ...` opens the catalog the services use: the pod mounts the gateway config where the
    README's command reads it, and the catalog path of that config is on the shared claim."""
    spec = pod("ext-authz")
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    (config_volume,) = [v for v in spec["volumes"] if v["name"] == mounts[CONFIG_MOUNT]["name"]]
    assert config_volume["configMap"]["name"] == "mcp-gateway-config"
    readme = (K8S / "README.md").read_text()
    assert f"mcp-gateway --config {CONFIG_MOUNT}/gateway.yaml catalog approve" in readme
    volume, _ = storage("ext-authz", config().catalog.path)
    claim(volume)
