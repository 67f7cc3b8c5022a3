"""The audit keys in docker compose and Kubernetes: the audit writers (ext_authz, the MCP servers)
seal personal fields (audit.master_key) and sign their checkpoints (audit.signing_key); compose's
pki-init makes both once on a volume only it and the writers mount, Kubernetes takes them from
the operator's Secrets; nothing else gets them."""

from __future__ import annotations

import argparse
import stat
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.telemetry.audit_chain import CheckpointSigner
from gateway.telemetry.audit_keys import KeyStoreError, SubjectKeyStore, master_key_from_env
from gatewayctl import compose_init
from gatewayctl.commands.audit import master_key
from gatewayctl.devstack.state import StackError
from mcp_servers.core.app import add_common_arguments, settings_from_args

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GATEWAY = REPO / "deploy/compose/gateway.yaml"
K8S = REPO / "deploy/k8s"
NAME = "MCP_GATEWAY_AUDIT_MASTER_KEY"
VOLUME = "audit-keys"
SECRET = "mcp-gateway-audit-master-key"
SIGNING_SECRET = "mcp-gateway-audit-signing-key"


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, options) of a compose service's short-syntax volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        out[target] = (source, options[0] if options else "")
    return out


def writers(config: GatewayConfig) -> set[str]:
    """The compose services / Kubernetes Deployments that write an audit trail (the console: who
    searched or exported it)."""
    return {i.host for i in config.ext_authz.instances} | {
        i.host for s in config.servers for i in s.instances} | {i.host for i in config.console.instances}


def test_compose_writers_seal_with_the_key_pki_init_makes() -> None:
    """audit.master_key is on (a listed secret); every audit writer gets <name>_FILE naming the
    key file on the audit-keys volume, mounted read-only by the writers and read-write by pki-init
    only (which has the variable too); the servers read it with --audit-master-key-env, and sign
    with audit.signing_key, a file on the same volume."""
    config = load_config(COMPOSE_GATEWAY)
    assert config.audit.master_key == NAME and NAME in config.secrets
    assert config.audit.signing_key is not None
    services = compose_services()
    expected = writers(config)
    assert len(expected) >= 4
    holders = {}
    for name, service in services.items():
        for target, (source, options) in mounts(service).items():
            if source == VOLUME:
                holders[name] = (target, options)
    assert set(holders) == expected | {"pki-init"}
    for name, (target, options) in holders.items():
        path = PurePosixPath(services[name]["environment"][f"{NAME}_FILE"])
        assert str(path.parent) == target, name
        assert options == ("" if name == "pki-init" else "ro"), name
    for server in config.servers:
        for instance in server.instances:
            command = services[instance.host]["command"]
            assert command[command.index("--audit-master-key-env") + 1] == NAME, instance.host
            assert command[command.index("--audit-signing-key") + 1] == config.audit.signing_key
    assert str(PurePosixPath(config.audit.signing_key).parent) == holders["pki-init"][0]
    # Nobody else gets the key or its file.
    for name, service in services.items():
        if name not in holders:
            assert f"{NAME}_FILE" not in (service.get("environment") or {}), name


def test_pki_init_makes_the_master_key_once_and_the_writers_read_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pki-init makes the master key file and the signing key (0600 in a 0700 folder) on its
    first run and never replaces them; ext_authz's reader, the servers' --audit-master-key-env and
    the CLI all read the master key through <name>_FILE, and a key store opens under it; the
    signing key loads."""
    folder = tmp_path / VOLUME
    folder.mkdir()
    config = load_config(COMPOSE_GATEWAY)
    config = replace(config, audit=replace(config.audit, signing_key=str(folder / "audit-signing.pem")))
    key_file = folder / "master.key"
    monkeypatch.delenv(NAME, raising=False)
    monkeypatch.setenv(f"{NAME}_FILE", str(key_file))
    uid = key_file.parent.stat().st_uid
    assert compose_init.ensure_audit_master_key(config, uid=uid) == key_file
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    before = key_file.read_bytes()
    assert compose_init.ensure_audit_master_key(config, uid=uid) is None
    assert key_file.read_bytes() == before
    signing = folder / "audit-signing.pem"
    assert compose_init.ensure_audit_signing_key(config, uid=uid)
    assert stat.S_IMODE(signing.stat().st_mode) == 0o600
    pem = signing.read_bytes()
    assert not compose_init.ensure_audit_signing_key(config, uid=uid) and signing.read_bytes() == pem
    CheckpointSigner.from_file(signing)
    key = master_key_from_env(NAME)
    assert key is not None and len(key) == 32
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--audit-file", str(tmp_path / "a.jsonl"), "--audit-master-key-env", NAME])
    assert settings_from_args(args).audit_master_key == key
    assert master_key(config) == key
    SubjectKeyStore(tmp_path, key).close()


def test_pki_init_without_the_volume_fails_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file whose folder is not mounted is an error naming the variable, not a key made
    where the writers cannot see it; an empty key file is refused by the readers."""
    config = load_config(COMPOSE_GATEWAY)
    monkeypatch.delenv(NAME, raising=False)
    monkeypatch.setenv(f"{NAME}_FILE", str(tmp_path / "missing" / "master.key"))
    with pytest.raises(StackError, match=f"{NAME}_FILE"):
        compose_init.ensure_audit_master_key(config)
    (tmp_path / "empty.key").write_text("")
    monkeypatch.setenv(f"{NAME}_FILE", str(tmp_path / "empty.key"))
    with pytest.raises(KeyStoreError, match="empty"):
        master_key_from_env(NAME)


def k8s_pods() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d.get("kind") == "Deployment"}


def k8s_containers() -> dict[str, dict[str, Any]]:
    out = {}
    for name, pod in k8s_pods().items():
        [container] = pod["containers"]
        out[name] = container
    return out


def test_k8s_writers_get_the_master_key_from_the_secret_and_nobody_else() -> None:
    """audit.master_key is on in the Kubernetes config (and its rendered ConfigMap); ext-authz, the
    console and each server get the variable from the Secret mcp-gateway-audit-master-key, the servers name it
    with --audit-master-key-env; no other Deployment gets it. The signing key's Secret is mounted
    (whole, group-readable) at audit.signing_key's folder by the same pods only, and the servers
    sign with that file."""
    config = load_config(K8S / "gateway.yaml")
    assert config.audit.master_key == NAME and NAME in config.secrets
    rendered = yaml.safe_load((K8S / "configmap-gateway.yaml").read_text())["data"]["gateway.yaml"]
    assert yaml.safe_load(rendered)["audit"]["master_key"] == NAME
    containers = k8s_containers()
    holders = set()
    for name, container in containers.items():
        for env in container.get("env", []):
            if env["name"] == NAME:
                assert env["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": "key"}}, name
                holders.add(name)
    servers = {s.name for s in config.servers if s.kind == "module"}
    assert holders == {"ext-authz", "console", *servers}
    for server in servers:
        command = containers[server]["command"]
        assert command[command.index("--audit-master-key-env") + 1] == NAME, server
        assert command[command.index("--audit-signing-key") + 1] == config.audit.signing_key, server
    assert config.audit.signing_key is not None
    pods = k8s_pods()
    signers = set()
    for name, pod in pods.items():
        [container] = pod["containers"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            secret = volumes[mount["name"]].get("secret", {})
            if secret.get("secretName") == SIGNING_SECRET:
                assert mount["mountPath"] == str(PurePosixPath(config.audit.signing_key).parent), name
                assert mount.get("readOnly") and "subPath" not in mount and secret["defaultMode"] == 0o440
                signers.add(name)
    assert signers == holders
