"""The aggregate: and virtual_servers: sections: what they accept, and every mistake named by
its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    DEFAULT_AGGREGATE_SESSION_KEYS,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    GatewayConfig,
    Instance,
    load_config,
    parse_config,
)


def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    return raw


def _config(**patch: Any) -> GatewayConfig:
    return parse_config({**_raw(), **patch}, base_dir=Path("/srv/gw"))


def test_default_config_runs_one_aggregator_with_its_key_secret() -> None:
    """The dev stack's config turns /mcp on: one aggregator on loopback, the inner listener, and
    the session key secret generated like the other dev secrets."""
    cfg = load_config()
    agg = cfg.aggregate
    assert agg.enabled and agg.instances == (Instance("127.0.0.1", 9301),)
    assert agg.inner_listener == Instance("127.0.0.1", 9300)
    assert agg.session_keys == DEFAULT_AGGREGATE_SESSION_KEYS in cfg.secrets
    assert cfg.virtual_servers == ()


def test_aggregate_is_off_without_its_section() -> None:
    """A config without aggregate: (every config written before it) serves no /mcp."""
    raw = _raw()
    del raw["aggregate"]
    cfg = parse_config(raw, base_dir=Path("/srv/gw"))
    assert not cfg.aggregate.enabled and cfg.aggregate.instances == ()
    assert cfg.aggregate.inner_listener is None
    # Tokens are only valid for the per-server resources then.
    assert "https://127.0.0.1:8443/mcp" not in cfg.issuers[0].audiences


def test_virtual_servers_and_audiences() -> None:
    """A virtual server keeps its globs and description; the default audiences add /mcp and
    /mcp/<virtual> to the per-server resources."""
    cfg = _config(virtual_servers={"readonly": {
        "tools": ["files/read_*", "database/list_tables", "time/get_[ct]*"],
        "description": "Read-only"}})
    (virtual,) = cfg.virtual_servers
    assert virtual.name == "readonly" and virtual.description == "Read-only"
    assert virtual.tools == ("files/read_*", "database/list_tables", "time/get_[ct]*")
    assert cfg.virtual_server("readonly") is virtual
    audiences = cfg.issuers[0].audiences
    assert cfg.aggregate_url() == "https://127.0.0.1:8443/mcp" in audiences
    assert cfg.aggregate_url("readonly") == "https://127.0.0.1:8443/mcp/readonly" in audiences
    assert cfg.resource_url("files") in audiences


def test_disabled_aggregate_needs_no_instances_or_secret() -> None:
    """enabled: false switches /mcp off without asking for its processes or keys."""
    cfg = _config(aggregate={"enabled": False}, secrets=["ERP_API_KEY", "MCP_GATEWAY_AUDIT_MASTER_KEY"])
    assert not cfg.aggregate.enabled and cfg.aggregate.instances == ()


@pytest.mark.parametrize(("patch", "message"), [
    ({"aggregate": {"enabled": True, "inner_listener": {"port": 9300},
                    "session_keys": DEFAULT_AGGREGATE_SESSION_KEYS}},
     "aggregate.instances must be a list of at least 1"),
    ({"aggregate": {"instances": [{"port": 9301}], "session_keys": DEFAULT_AGGREGATE_SESSION_KEYS}},
     "aggregate.inner_listener is required"),
    ({"aggregate": {"instances": [{"port": 9301}], "inner_listener": {"port": 9300},
                    "session_keys": "NOT_LISTED"}},
     "aggregate.session_keys: 'NOT_LISTED' is not listed in secrets"),
    ({"aggregate": {"instances": [{"port": 9301}], "inner_listener": {"port": 9300},
                    "sessions": "x"}},
     "aggregate: unknown key(s) sessions"),
    ({"aggregate": {"enabled": "yes"}}, "aggregate.enabled must be bool"),
    ({"aggregate": {"instances": [{"port": 9201}], "inner_listener": {"port": 9300}}},
     "aggregate.instances[0] and servers.files.instances[0] both listen on port 9201"),
    ({"aggregate": {"instances": [{"port": 9301}], "inner_listener": {"port": 8443}}},
     "aggregate.inner_listener and listen both listen on port 8443"),
    ({"aggregate": {"enabled": False}, "virtual_servers": {"ro": {"tools": ["files/read_*"]}}},
     "virtual_servers are served by the aggregate endpoint"),
    ({"virtual_servers": ["ro"]}, "virtual_servers must be a mapping"),
    ({"virtual_servers": {"files": {"tools": ["files/read_*"]}}},
     "virtual_servers.files: 'files' is also a server name"),
    ({"virtual_servers": {"Read_Only": {"tools": ["files/read_*"]}}},
     "virtual_servers.Read_Only: a virtual server name is lower-case letters"),
    ({"virtual_servers": {"a__b": {"tools": ["files/read_*"]}}},
     "virtual_servers.a__b: a virtual server name"),
    ({"virtual_servers": {"ro": {"tools": []}}}, "virtual_servers.ro.tools must list at least one"),
    ({"virtual_servers": {"ro": {}}}, "virtual_servers.ro.tools is required"),
    ({"virtual_servers": {"ro": {"tools": ["read_file"]}}},
     "virtual_servers.ro.tools[0] must be \"<server>/<tool glob>\""),
    ({"virtual_servers": {"ro": {"tools": ["files/read_*", "nosuch/x"]}}},
     "virtual_servers.ro.tools[1]: 'nosuch' is not a configured server"),
    ({"virtual_servers": {"ro": {"tools": ["files/"]}}},
     "virtual_servers.ro.tools[0]: '' is not a tool name glob"),
    ({"virtual_servers": {"ro": {"tools": ["files/a/b"]}}},
     "virtual_servers.ro.tools[0]: 'a/b' is not a tool name glob"),
    ({"virtual_servers": {"ro": {"tools": ["files/read file"]}}},
     "virtual_servers.ro.tools[0]: 'read file' is not a tool name glob"),
    ({"virtual_servers": {"ro": {"tools": ["files/read_[ab"]}}},
     "virtual_servers.ro.tools[0]: unbalanced '[' ']'"),
    ({"virtual_servers": {"ro": {"tools": [3]}}},
     "virtual_servers.ro.tools[0] must be \"<server>/<tool glob>\", got 3"),
    ({"virtual_servers": {"ro": {"tools": ["files/*"], "title": "x"}}},
     "virtual_servers.ro: unknown key(s) title"),
])
def test_mistakes_are_named_by_key(patch: dict[str, Any], message: str) -> None:
    """Each mistake in aggregate: or virtual_servers: fails at load time naming its key."""
    with pytest.raises(ConfigError) as info:
        _config(**patch)
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["a__b", "files_"])
def test_server_names_keep_the_aggregate_names_unambiguous(name: str) -> None:
    """A server name with '__' (or ending in '_') would make <server>__<tool> ambiguous; a '+'
    (the URI separator) was never a server name character."""
    raw = _raw()
    raw["servers"] = {**raw["servers"], name: {"module": "m", "instances": [{"port": 9999}]}}
    with pytest.raises(ConfigError, match=f"servers.{name}: a server name may not contain '__'"):
        parse_config(raw, base_dir=Path("/srv/gw"))
    raw["servers"] = {"a+b": {"module": "m", "instances": [{"port": 9999}]}}
    with pytest.raises(ConfigError, match=r"servers.a\+b: a server name is letters"):
        parse_config(raw, base_dir=Path("/srv/gw"))
