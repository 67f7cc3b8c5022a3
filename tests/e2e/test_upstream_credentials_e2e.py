"""Upstream credentials through the real Envoy (docs/upstream-credentials.md): one upstream that
reports the raw header lines it received, behind several gateway servers with different
``credentials``. In every case the client's bearer token is not among those lines; a static
credential arrives in its header.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import yaml
from jwt.algorithms import ECAlgorithm

from gateway.catalog import Catalog
from gateway.config import JWKS_PATH, load_config
from gatewayctl import cli, devstack
from tests.e2e.conftest import HAS_EXT_PROC, installed
from tests.e2e.helpers import (
    MODERN,
    MODERN_META,
    REPO,
    authz_transport,
    bearer,
    stack_config,
    stateless_call,
    tls_context,
    wait_until,
)
from tests.ports import free_port, free_ports

START_SECONDS = 20.0
STATIC_SECRET = "static-upstream-secret-1"  # noqa: S105  # a test value
KEY_SECRET = "api-key-upstream-secret-2"  # noqa: S105  # a test value
STS_SECRET = "sts-client-secret-3"  # noqa: S105  # a test value
STORE_KEY = "e2e-store-key-0123456789abcdef"
AGGREGATE_KEYS = "MCP_GATEWAY_AGGREGATE_KEYS"
SERVERS = ("plain", "static_auth", "static_key", "exchange", "exchange_down", "store",
           "exchange_assertion", "static_unset")


@dataclass
class Env:
    stack: devstack.Stack
    tmp: Path
    sts_url: str
    config_path: Path

    def sts_log(self) -> dict[str, Any]:
        """What the token endpoint received and issued."""
        return dict(httpx2.get(f"{self.sts_url}/-/requests", timeout=5).json())

    def call(self, server: str, token: str | None = None) -> tuple[httpx2.Response, str]:
        """One stateless call of ``headers`` on ``server``; the answer and the token used."""
        token = token or bearer(self.stack.config, "admin")
        return asyncio.run(stateless_call(self.stack, server, token, "headers")), token


def received(reply: httpx2.Response) -> list[tuple[str, str]]:
    """The upstream's raw header lines, from its answer."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "result" in body, body
    return [(k.lower(), v) for k, v in json.loads(body["result"]["content"][0]["text"])]


def assert_no_client_token(lines: list[tuple[str, str]], token: str) -> None:
    """Neither the token nor any part of it (its signature) is in any header line."""
    signature = token.rsplit(".", 1)[-1]
    for name, value in lines:
        assert token not in value and signature not in value, (name, value)


def _policy(target: Path, servers: tuple[str, ...]) -> Path:
    target.mkdir()
    for rego in (REPO / "policies").glob("*.rego"):
        if not rego.name.endswith("_test.rego"):
            shutil.copy(rego, target / rego.name)
    data = json.loads((REPO / "policies" / "data.json").read_text(encoding="utf-8"))
    for server in servers:
        data["gateway"]["servers"][server] = {"tenants": ["*"]}
        data["gateway"]["roles"]["admin"]["tools"][server] = ["*"]
    (target / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return target


def _pinned(stack: devstack.Stack, servers: tuple[str, ...]) -> bool:
    with Catalog(stack.config.catalog.path) as catalog:
        return all(catalog.get(s, "headers") is not None for s in servers)


def _answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not (installed("ext_authz.__main__") and installed("mcp_aggregator.__main__")):
        pytest.skip("needs ext_authz and mcp_aggregator")
    tmp = tmp_path_factory.mktemp("upstream-credentials")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.e2e.credentials_upstream",
                               "--port", str(port)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    sts_port = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "tests.gateway.credentials.sts",
                                   "--port", str(sts_port), "--client-secret", STS_SECRET], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    sts_url = f"http://127.0.0.1:{sts_port}"
    url = f"http://127.0.0.1:{port}/mcp"
    exchange = {"kind": "token_exchange", "client_id": "gateway", "client_secret": "STS_SECRET",
                "audience": "urn:crm"}
    servers: dict[str, dict[str, Any]] = {
        "plain": {"url": url},
        "static_auth": {"url": url, "credentials": {"kind": "static", "secret": "UP_STATIC",
                                                    "prefix": "Bearer "}},
        "static_key": {"url": url, "credentials": {"kind": "static", "secret": "UP_API_KEY",
                                                   "header": "x-api-key"}},
        "exchange": {"url": url, "credentials": {**exchange, "token_endpoint": f"{sts_url}/token"}},
        "exchange_down": {"url": url, "credentials": {
            **exchange, "token_endpoint": f"http://127.0.0.1:{free_port()}/token"}},
        "store": {"url": url, "credentials": {"kind": "user_store", "key": "STORE_KEY"}},
        "exchange_assertion": {"url": url, "credentials": {
            **exchange, "token_endpoint": f"{sts_url}/token", "subject": "assertion"}},
        # A static credential nobody set: the dev stack must not generate one.
        "static_unset": {"url": url, "credentials": {"kind": "static", "secret": "UP_UNSET"}},
    }
    aggregator, inner = free_ports(2)
    extra = {"policy": {"engine": "embedded", "dir": str(_policy(tmp / "policies", SERVERS))},
             "secrets": ["UP_STATIC", "UP_API_KEY", "STS_SECRET", "STORE_KEY", "UP_UNSET",
                         AGGREGATE_KEYS],
             "aggregate": {"instances": [{"port": aggregator}], "inner_listener": {"port": inner},
                           "session_keys": AGGREGATE_KEYS},
             "identity": {"assertion": True}}
    path = stack_config(tmp, servers=servers, ext_authz=1, extra=extra,
                        authz_transport=authz_transport())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["catalog"] = {**raw["catalog"], "mode": "tofu", "refresh_seconds": 1.0}
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", str(REPO))
            mp.setenv("UP_STATIC", STATIC_SECRET)
            mp.setenv("UP_API_KEY", KEY_SECRET)
            mp.setenv("STS_SECRET", STS_SECRET)
            mp.setenv("STORE_KEY", STORE_KEY)
            mp.delenv("UP_UNSET", raising=False)
            wait_until(lambda: _answers(f"{sts_url}/-/health"), "the token endpoint to answer")
            with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                                  startup_timeout=START_SECONDS) as stack:
                wait_until(lambda: _pinned(stack, SERVERS), "the catalog to pin every server's tool")
                yield Env(stack, tmp, sts_url, path)
    finally:
        for proc in procs:
            _stop(proc)


def test_no_credential_server_gets_no_authorization(env: Env) -> None:
    """A server without credentials receives no Authorization line and nothing of the token."""
    reply, token = env.call("plain")
    lines = received(reply)
    assert "authorization" not in {name for name, _ in lines}
    assert_no_client_token(lines, token)


def test_static_credential_replaces_the_token_in_authorization(env: Env) -> None:
    """A static credential in Authorization arrives as the only Authorization line."""
    reply, token = env.call("static_auth")
    lines = received(reply)
    assert [v for n, v in lines if n == "authorization"] == [f"Bearer {STATIC_SECRET}"]
    assert_no_client_token(lines, token)


def test_static_credential_in_its_own_header(env: Env) -> None:
    """A static credential in x-api-key arrives there; Authorization is still removed."""
    reply, token = env.call("static_key")
    lines = received(reply)
    assert [v for n, v in lines if n == "x-api-key"] == [KEY_SECRET]
    assert "authorization" not in {name for name, _ in lines}
    assert_no_client_token(lines, token)


def test_a_client_sent_credential_header_is_overwritten(env: Env) -> None:
    """A client that sends the credential's header itself does not get its value through."""
    token = bearer(env.stack.config, "admin")
    reply = asyncio.run(stateless_call(env.stack, "static_key", token, "headers",
                                       headers={"x-api-key": "forged"}))
    lines = received(reply)
    assert [v for n, v in lines if n == "x-api-key"] == [KEY_SECRET]
    assert_no_client_token(lines, token)


def test_token_exchange_round_trip_is_cached(env: Env) -> None:
    """Two calls with one client token: one exchange (the token is its subject, the upstream
    the audience); both calls carry the issued token as the only Authorization line."""
    token = bearer(env.stack.config, "admin", sub="xchg-user")
    first, _ = env.call("exchange", token)
    second, _ = env.call("exchange", token)
    log = env.sts_log()
    mine = [i for i in log["issued"] if i["subject_token"] == token]
    assert len(mine) == 1 and mine[0]["audience"] == "urn:crm"
    for reply in (first, second):
        lines = received(reply)
        assert [v for n, v in lines if n == "authorization"] == [f"Bearer {mine[0]['token']}"]
        assert_no_client_token(lines, token)


def test_token_endpoint_down_fails_closed(env: Env) -> None:
    """An unreachable token endpoint: 503 with a JSON-RPC error naming the reason and the
    server; nothing reaches the upstream."""
    reply, _ = env.call("exchange_down")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["data"]["reason"] == "token_exchange_unavailable"
    assert error["data"]["server"] == "exchange_down"
    assert reply.headers["retry-after"] == "1"


def test_user_store_register_call_revoke(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """No registered credential: 403 telling the user how to register one. After
    `mcp-gateway credentials set` the call carries it (and not the client's token); after
    `credentials revoke` the same 403 again."""
    token = bearer(env.stack.config, "admin", sub="store-user")
    reply, _ = env.call("store", token)
    assert reply.status_code == 403, reply.text
    error = reply.json()["error"]
    assert error["data"]["reason"] == "upstream_credential_missing"
    assert error["data"]["action"] == "register_credential"
    assert "mcp-gateway credentials set --server store" in error["message"]

    monkeypatch.setenv("USER_CRED", "crm-token-of-store-user")
    assert cli.main(["--config", str(env.config_path), "credentials", "set", "--server", "store",
                     "--sub", "store-user", "--from-env", "USER_CRED"]) == 0
    reply, _ = env.call("store", token)
    lines = received(reply)
    assert [v for n, v in lines if n == "authorization"] == ["Bearer crm-token-of-store-user"]
    assert_no_client_token(lines, token)

    other = bearer(env.stack.config, "admin", sub="someone-else")  # another user: not theirs
    assert env.call("store", other)[0].status_code == 403

    assert cli.main(["--config", str(env.config_path), "credentials", "revoke", "--server",
                     "store", "--sub", "store-user"]) == 0
    reply, _ = env.call("store", token)
    assert reply.status_code == 403
    assert reply.json()["error"]["data"]["reason"] == "upstream_credential_missing"


def _aggregate_call(env: Env, tool: str, token: str) -> httpx2.Response:
    """One stateless tools/call of ``tool`` (``<server>__headers``) on /mcp."""
    async def call() -> httpx2.Response:
        async with httpx2.AsyncClient(verify=tls_context(env.stack), timeout=20) as http:
            return await http.post(env.stack.config.aggregate_url(), json={
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": {}, "_meta": MODERN_META}}, headers={
                "authorization": f"Bearer {token}", "content-type": "application/json",
                "accept": "application/json, text/event-stream", "mcp-protocol-version": MODERN,
                "mcp-method": "tools/call", "mcp-name": tool})
    return asyncio.run(call())


def test_aggregate_endpoint_calls_carry_the_credential_not_the_token(env: Env) -> None:
    """A call routed by /mcp to a credentialed server carries its credential in place of the
    client's token; one to a server without credentials carries no Authorization."""
    token = bearer(env.stack.config, "admin")
    lines = received(_aggregate_call(env, "static_auth__headers", token))
    assert [v for n, v in lines if n == "authorization"] == [f"Bearer {STATIC_SECRET}"]
    assert_no_client_token(lines, token)
    lines = received(_aggregate_call(env, "plain__headers", token))
    assert "authorization" not in {name for name, _ in lines}
    assert_no_client_token(lines, token)


def test_token_exchange_of_the_caller_assertion(env: Env) -> None:
    """subject: assertion: the token endpoint receives a gateway-signed assertion (verifiable
    with the JWKS Envoy publishes, audience the token endpoint and not the upstream, naming the
    caller), never the client's
    token; the upstream receives the issued token."""
    token = bearer(env.stack.config, "admin", sub="assertion-user")
    reply, _ = env.call("exchange_assertion", token)
    lines = received(reply)
    log = env.sts_log()
    (request,) = [r for r in log["requests"]
                  if r["form"]["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"]
    form = request["form"]
    assert token not in form.values()
    issued = [i["token"] for i in log["issued"] if i["subject_token"] == form["subject_token"]]
    assert [v for n, v in lines if n == "authorization"] == [f"Bearer {issued[0]}"]
    assert_no_client_token(lines, token)
    jwks_url = f"{env.stack.config.public_url}{JWKS_PATH}"
    keys = httpx2.get(jwks_url, verify=tls_context(env.stack), timeout=5).json()
    header = jwt.get_unverified_header(form["subject_token"])
    (jwk,) = [k for k in keys["keys"] if k["kid"] == header["kid"]]
    claims = jwt.decode(form["subject_token"], ECAlgorithm.from_jwk(jwk),  # type: ignore[arg-type]
                        algorithms=["ES256"], audience=f"{env.sts_url}/token",
                        issuer=env.stack.config.public_url.rstrip("/"))
    assert claims["sub"] == "assertion-user"


def test_an_unset_static_credential_is_503_not_a_generated_key(env: Env) -> None:
    """A static credential whose secret nobody set is not generated by the dev stack: calls to
    its server answer 503 upstream_credential_unavailable and nothing reaches the upstream."""
    assert not (devstack.paths(env.stack.config).secrets_dir / "UP_UNSET").exists()
    reply, _ = env.call("static_unset")
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["data"]["reason"] == "upstream_credential_unavailable"
    assert error["data"]["server"] == "static_unset"
