"""The process plan: start order, arguments, ports and which processes receive which secret."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gatewayctl import devstack
from tests.e2e.helpers import stack_config


def test_plan_starts_envoy_last_and_passes_instance_ports(config_file: Path) -> None:
    """Processes are planned JWKS first, Envoy last, each server instance with its own port."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    names = [c.label for c in comps]
    assert names == ["jwks[0]", "ext_authz[0]", "ext_authz[1]", "files[0]", "files[1]", "envoy[0]"]
    files0 = comps[3]
    assert files0.argv[1:3] == ("-m", "tests.e2e.standin_upstream")
    assert files0.argv[3:7] == ("--host", "127.0.0.1", "--port", str(config.servers[0].instances[0].port))
    assert comps[1].argv[-2:] == ("--port", str(config.ext_authz.instances[0].port))
    assert [c.name for c in devstack.plan(config, ext_proc=True)].count("ext_proc") == 2


def test_services_get_the_users_config_file(config_file: Path) -> None:
    """ext_authz gets --config with the user's file; with the embedded default, no --config."""
    comps = devstack.plan(load_config(config_file), ext_proc=False)
    assert comps[1].argv[3:5] == ("--config", str(config_file.resolve()))
    default = devstack.plan(load_config(), ext_proc=False)
    authz = next(c for c in default if c.name == "ext_authz")
    assert "--config" not in authz.argv


def test_port_in_use_is_named(config_file: Path) -> None:
    """A port that is already taken fails fast with its number and the component's name."""
    config = load_config(config_file)
    port = config.servers[0].instances[1].port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        with pytest.raises(devstack.StackError, match=rf"port {port} .*files\[1\].* already in use"):
            devstack.Stack(config, ext_proc=False).prepare()


def test_duplicate_ports_are_rejected(config_file: Path) -> None:
    """Two components configured on one port are reported before anything starts."""
    config = load_config(config_file)
    comps = devstack.plan(config, ext_proc=False)
    ports = devstack.listening_ports(config, comps) + [("extra", "127.0.0.1", comps[0].port)]
    with pytest.raises(devstack.StackError, match="configured for both"):
        devstack.check_ports(ports)


def test_backends_start_first_and_secrets_go_only_where_listed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Backends are wave 0; a dev secret is generated once (0600), reused, overridable from the
    environment, and only components that list it receive it."""
    extra = {"secrets": ["ERP_API_KEY"],
             "backends": {"erp_demo": {"module": "mcp_servers.erp_demo", "instance": {"port": 9230},
                                       "env": ["ERP_API_KEY"]}}}
    servers: dict[str, dict[str, Any]] = {
        "erp": {"module": "tests.e2e.standin_upstream", "env": ["ERP_API_KEY"]},
               "files": {"module": "tests.e2e.standin_upstream"}}
    config = load_config(stack_config(tmp_path, servers=servers, extra=extra))
    comps = devstack.plan(config, ext_proc=False)
    assert comps[0].name == "erp_demo" and comps[0].wave == 0 and comps[-1].wave == 2
    assert {c.name for c in comps if c.env} == {"erp_demo", "erp"}
    monkeypatch.delenv("ERP_API_KEY", raising=False)
    first = devstack.ensure_secrets(config)
    stored = devstack.paths(config).secrets_dir / "ERP_API_KEY"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert devstack.ensure_secrets(config) == first and len(first["ERP_API_KEY"]) >= 32
    monkeypatch.setenv("ERP_API_KEY", "from-the-operator")
    assert devstack.ensure_secrets(config) == {"ERP_API_KEY": "from-the-operator"}
