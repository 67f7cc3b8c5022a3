"""The dev stack's part of the aggregate endpoint: the aggregator processes, the key ring for
them and ext_authz, the inner listener's port, dev tokens valid for /mcp, and the banner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from gatewayctl import devstack
from gatewayctl.devstack.banner import banner
from gatewayctl.devstack.plan import listening_ports
from tests.ports import free_ports

KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"


def _with_aggregate(config_file: Path) -> Path:
    raw: dict[str, Any] = yaml.safe_load(config_file.read_text())
    aggregator, inner = free_ports(2)
    raw["secrets"] = [KEYS]
    raw["aggregate"] = {"instances": [{"port": aggregator}], "inner_listener": {"port": inner}}
    raw["virtual_servers"] = {"ro": {"tools": ["files/read_*"]}}
    config_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return config_file


def test_aggregators_are_planned_before_envoy_with_the_key_ring(config_file: Path) -> None:
    """One aggregator per instance, told the config file, Envoy's inner listener and the public
    host; it and ext_authz receive the key ring secret; Envoy still starts last."""
    config = load_config(_with_aggregate(config_file))
    comps = devstack.plan(config, ext_proc=False)
    assert [c.name for c in comps][-2:] == ["aggregator", "envoy"]
    agg = comps[-2]
    inner = config.aggregate.inner_listener
    assert inner is not None
    assert agg.argv[1:3] == ("-m", "mcp_aggregator")
    args = dict(zip(agg.argv[3::2], agg.argv[4::2], strict=False))
    assert args["--port"] == str(config.aggregate.instances[0].port)
    assert args["--config"] == str(config_file.resolve())
    assert args["--upstream-base"] == f"http://127.0.0.1:{inner.port}"
    assert args["--allowed-host"] == "127.0.0.1"
    assert agg.env == (KEYS,) and agg.probe.path == "/ready"
    assert all(KEYS in c.env for c in comps if c.name == "ext_authz")
    assert ("envoy inner listener", "127.0.0.1", inner.port) in listening_ports(config, comps)


def test_without_aggregate_nothing_changes(config_file: Path) -> None:
    """A config without aggregate: plans no aggregator and hands ext_authz no key ring."""
    comps = devstack.plan(load_config(config_file), ext_proc=False)
    assert "aggregator" not in [c.name for c in comps]
    assert all(KEYS not in c.env for c in comps)


def test_dev_token_is_valid_for_mcp_and_the_banner_shows_it_first(config_file: Path) -> None:
    """The dev token's audience names /mcp and each virtual server besides the servers; the
    banner lists /mcp first and points the client snippets at it."""
    config = load_config(_with_aggregate(config_file))
    devstack.Stack(config, ext_proc=False).prepare()
    token = devstack.dev_token(config)
    audience = jwt.decode(token, options={"verify_signature": False})["aud"]
    assert config.aggregate_url() in audience and config.aggregate_url("ro") in audience
    assert config.resource_url("files") in audience
    text = banner(config, token, None)
    endpoints = text.split("Endpoints (Streamable HTTP, TLS):\n", 1)[1].splitlines()
    assert endpoints[0].split()[0] == config.aggregate_url()
    assert endpoints[1].split()[0] == config.aggregate_url("ro")
    assert f"streamable_http_client({config.aggregate_url()!r}" in text
    assert '"mcp-gateway"' in text and f'"url": "{config.aggregate_url()}"' in text


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_inner_listener_is_reached_on_loopback(host: str) -> None:
    """An inner listener on every address is called on loopback by the local aggregator."""
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    raw["aggregate"]["inner_listener"] = {"host": host, "port": 9300}
    config = parse_config(raw, base_dir=Path.cwd(), source=str(DEFAULT_CONFIG_PATH))
    (agg,) = [c for c in devstack.plan(config, ext_proc=False) if c.name == "aggregator"]
    base = agg.argv[agg.argv.index("--upstream-base") + 1]
    assert base == ("http://127.0.0.1:9300" if host == "0.0.0.0" else "http://[::1]:9300")
