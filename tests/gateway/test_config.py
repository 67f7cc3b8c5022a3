"""The gateway config file: the embedded default loads, and mistakes are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config


def _default() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    return raw


def test_default_config_loads() -> None:
    """The embedded default has every server with two instances and audiences per server."""
    cfg = load_config()
    assert [s.name for s in cfg.servers] == ["files", "database", "conformance"]
    assert all(len(s.instances) == 2 for s in cfg.servers)
    assert cfg.resource_url("files") == "https://127.0.0.1:8443/mcp/files"
    assert cfg.resource_url("files") in cfg.issuers[0].audiences
    assert cfg.policy.engine == "embedded"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"tls": {"cert_file": "a", "key_file": "b", "min_version": "TLSv1_0"}}, "tls.min_version"),
        ({"issuers": [{"issuer": "x", "jwks_url": "y", "algorithms": ["HS256"]}]}, "asymmetric"),
        ({"issuers": []}, "at least one token issuer"),
        ({"policy": {"engine": "opa"}}, "policy.opa_url is required"),
        ({"rate_limits": {"backend": "redis"}}, "rate_limits.redis_url is required"),
        ({"listen": {"port": 70000}}, "listen.port must be 1-65535"),
        ({"servers": {}}, "servers must be a non-empty mapping"),
        ({"catalog": {"mode": "yolo"}}, "catalog.mode"),
    ],
)
def test_invalid_configs_are_rejected_with_the_key_named(patch: dict[str, Any], message: str) -> None:
    """A contradiction or typo fails at load time with a message naming the key."""
    raw = {**_default(), **patch}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(raw, base_dir=Path.cwd())


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing config file is reported, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
