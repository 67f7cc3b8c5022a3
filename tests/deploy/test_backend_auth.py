"""OPA and Redis require the gateway's credentials in both deployments, and the gateway takes
them from secrets: Redis's password inside rate_limits.redis_url, OPA's bearer token in
policy.opa_token, OPA's system.authz admitting that token only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from regopy import Interpreter

from gateway.config import load_config

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy/k8s"
SYSTEM_AUTHZ = REPO / "deploy/opa/system-authz.rego"
REDIS_SECRET = "MCP_GATEWAY_REDIS_PASSWORD"
OPA_SECRET = "MCP_GATEWAY_OPA_TOKEN"
TOKEN = "t" * 40


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for d in k8s_docs() if d.get("kind") == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]}


def secret_env(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("config", [REPO / "deploy/compose/gateway.yaml", K8S / "gateway.yaml"])
def test_the_gateway_config_names_both_secrets(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis_url carries ${MCP_GATEWAY_REDIS_PASSWORD}, filled from the environment; opa_token
    names ${MCP_GATEWAY_OPA_TOKEN}; both are listed secrets."""
    monkeypatch.setenv(REDIS_SECRET, "s3cret/pw")
    cfg = load_config(config)
    assert {REDIS_SECRET, OPA_SECRET} <= set(cfg.secrets)
    assert cfg.rate_limits.redis_url is not None and cfg.rate_limits.redis_url.startswith("redis://:s3cret%2Fpw@")
    assert cfg.policy.opa_token == f"${{{OPA_SECRET}}}"
    assert "s3cret" not in repr(cfg)


def test_compose_redis_and_opa_require_credentials() -> None:
    """Redis starts with requirepass from the secret (not on its command line), OPA with token
    authentication and the system.authz policy; the services that talk to them get the secrets
    from the same variables."""
    doc = compose()
    svcs = doc["services"]
    redis = svcs["redis"]
    script = redis["entrypoint"][-1]
    assert "requirepass %s" in script and "$$REDISCLI_AUTH" in script
    assert "exec docker-entrypoint.sh redis-server /run/redis/redis.conf" in script
    assert redis["environment"]["REDISCLI_AUTH"].startswith(f"${{{REDIS_SECRET}:?")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]  # authenticated by REDISCLI_AUTH
    opa = svcs["opa"]
    assert {"--authentication=token", "--authorization=basic"} <= set(opa["command"])
    assert "/opa-system/system-authz.rego" in opa["command"]
    assert "./deploy/opa/system-authz.rego:/opa-system/system-authz.rego:ro" in opa["volumes"]
    assert opa["environment"][OPA_SECRET].startswith(f"${{{OPA_SECRET}:?")
    for name, svc in svcs.items():
        env = svc.get("environment", {})
        if name.startswith(("ext-authz", "aggregator")):
            assert env[REDIS_SECRET].startswith(f"${{{REDIS_SECRET}:?"), name
        if name.startswith(("ext-authz", "ext-proc")):
            assert env[OPA_SECRET].startswith(f"${{{OPA_SECRET}:?"), name


def test_k8s_redis_and_opa_require_credentials() -> None:
    """The same in Kubernetes, from the Secrets mcp-gateway-redis and mcp-gateway-opa-token; the
    policy is the opa-system-authz ConfigMap, rolled by its checksum."""
    cs = containers()
    assert secret_env(cs["redis"]) == {"REDISCLI_AUTH": ("mcp-gateway-redis", "password")}
    assert "requirepass %s" in cs["redis"]["command"][-1] and "$REDISCLI_AUTH" in cs["redis"]["command"][-1]
    assert cs["redis"]["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert {"--authentication=token", "--authorization=basic", "/opa-system/system-authz.rego"} \
        <= set(cs["opa"]["args"])
    assert secret_env(cs["opa"]) == {OPA_SECRET: ("mcp-gateway-opa-token", "token")}
    for name in ("ext-authz", "aggregator"):
        assert secret_env(cs[name])[REDIS_SECRET] == ("mcp-gateway-redis", "password"), name
    for name in ("ext-authz", "ext-proc"):
        assert secret_env(cs[name])[OPA_SECRET] == ("mcp-gateway-opa-token", "token"), name
    opa = next(d for d in k8s_docs() if d.get("kind") == "Deployment" and d["metadata"]["name"] == "opa")
    volumes = {v["name"]: v for v in opa["spec"]["template"]["spec"]["volumes"]}
    assert volumes["system-authz"]["configMap"]["name"] == "opa-system-authz"
    assert "checksum/opa-system-authz" in opa["spec"]["template"]["metadata"]["annotations"]
    cm = next(d for d in k8s_docs()
              if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "opa-system-authz")
    assert cm["data"]["system-authz.rego"] == SYSTEM_AUTHZ.read_text()


def allowed(request: dict[str, Any]) -> bool:
    interpreter = Interpreter()
    interpreter.add_module("system_authz", SYSTEM_AUTHZ.read_text())
    interpreter.set_input_term(json.dumps(request))
    answer = json.loads(str(interpreter.query("data.system.authz")))
    return bool(answer["expressions"][0]["allow"])


DECISION = {"method": "POST", "path": ["v1", "data", "mcp", "authz", "decision"]}


def test_system_authz_admits_the_gateway_token_for_decisions_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """OPA's access policy: the gateway's token may POST /v1/data/...; a wrong or missing token
    may not; the token may not write policies; health checks need none."""
    monkeypatch.setenv(OPA_SECRET, TOKEN)
    assert allowed({**DECISION, "identity": TOKEN})
    assert not allowed({**DECISION, "identity": "w" * 40})
    assert not allowed(DECISION)
    assert not allowed({"method": "PUT", "path": ["v1", "policies", "x"], "identity": TOKEN})
    assert not allowed({"method": "POST", "path": ["v1", "query"], "identity": TOKEN})
    assert allowed({"method": "GET", "path": ["health"]})


@pytest.mark.parametrize("token", [None, "short"])
def test_system_authz_fails_closed_without_a_real_token(token: str | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An OPA whose secret is unset (or too short to be one) admits nobody to decisions, even a
    caller presenting that same value."""
    if token is None:
        monkeypatch.delenv(OPA_SECRET, raising=False)
    else:
        monkeypatch.setenv(OPA_SECRET, token)
    assert not allowed({**DECISION, "identity": token or ""})
    assert not allowed(DECISION)
