"""Credentials of the gateway's own backends come from secrets, never from the config file:
Redis's password inside rate_limits.redis_url and OPA's bearer token in policy.opa_token."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, GatewayConfig, parse_config, secret_value


def raw(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    extra = top.pop("secrets", [])
    data.update(top)
    data["secrets"] = [*data.get("secrets", []), *extra]
    return data


def parse(data: dict[str, Any]) -> GatewayConfig:
    return parse_config(data, base_dir=DEFAULT_CONFIG_PATH.parent.parent)


REDIS = "redis://:${MCP_GATEWAY_REDIS_PASSWORD}@redis:6379/0"


def test_redis_password_comes_from_its_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ${NAME} in redis_url is the secret's value, percent-encoded so any password is safe."""
    monkeypatch.setenv("MCP_GATEWAY_REDIS_PASSWORD", "p@ss/word:1")
    cfg = parse(raw(secrets=["MCP_GATEWAY_REDIS_PASSWORD"],
                           rate_limits={"backend": "redis", "redis_url": REDIS}))
    assert cfg.rate_limits.redis_url == "redis://:p%40ss%2Fword%3A1@redis:6379/0"


def test_an_unset_redis_secret_stays_a_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the variable (config render on a CI machine) the URL keeps the reference: Redis
    refuses it, so nothing connects without the password."""
    monkeypatch.delenv("MCP_GATEWAY_REDIS_PASSWORD", raising=False)
    cfg = parse(raw(secrets=["MCP_GATEWAY_REDIS_PASSWORD"],
                           rate_limits={"backend": "redis", "redis_url": REDIS}))
    assert cfg.rate_limits.redis_url == REDIS


def test_a_redis_reference_must_be_a_listed_secret() -> None:
    with pytest.raises(ConfigError, match=r"rate_limits\.redis_url: \$\{MCP_GATEWAY_REDIS_PASSWORD\} "
                                          r"is not listed in secrets"):
        parse(raw(rate_limits={"backend": "redis", "redis_url": REDIS}))


@pytest.mark.parametrize("token", ["a-literal-token", "${NOT_LISTED}", "Bearer ${MCP_GATEWAY_OPA_TOKEN}"])
def test_opa_token_must_name_a_listed_secret(token: str) -> None:
    """policy.opa_token is only ever ${NAME} of a listed secret: a token written in the config
    (or any other shape) is refused naming the key."""
    with pytest.raises(ConfigError, match=r"policy\.opa_token must name a secret"):
        parse(raw(secrets=["MCP_GATEWAY_OPA_TOKEN"],
                         policy={"engine": "opa", "opa_url": "http://opa:8181", "opa_token": token}))


def test_opa_token_reference_is_kept_and_resolved_on_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """The config holds the reference (never the token); secret_value reads it when the engine
    is built, naming the variable when it is missing."""
    cfg = parse(raw(secrets=["MCP_GATEWAY_OPA_TOKEN"],
                           policy={"engine": "opa", "opa_url": "http://opa:8181",
                                   "opa_token": "${MCP_GATEWAY_OPA_TOKEN}"}))
    assert cfg.policy.opa_token == "${MCP_GATEWAY_OPA_TOKEN}"
    monkeypatch.setenv("MCP_GATEWAY_OPA_TOKEN", "t0ken")
    assert secret_value("${MCP_GATEWAY_OPA_TOKEN}", "policy.opa_token") == "t0ken"
    monkeypatch.delenv("MCP_GATEWAY_OPA_TOKEN")
    with pytest.raises(ConfigError, match="MCP_GATEWAY_OPA_TOKEN is not set"):
        secret_value("${MCP_GATEWAY_OPA_TOKEN}", "policy.opa_token")
