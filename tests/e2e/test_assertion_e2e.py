"""The signed caller assertion through the real stack (Envoy, ext_authz, our server, a
third-party server): upstreams get one x-mcp-assertion header instead of the identity headers,
our server builds the caller from it alone and refuses forged, expired, wrong-audience, replayed
or missing ones sent straight to its port (logging why), a server with no code of ours verifies
it with PyJWT from the JWKS Envoy publishes, and the keys rotate under load without a failed call.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
import yaml

from gateway.assertion import AssertionSigner, KeyRing, new_private_jwk
from gateway.caller import Caller
from gateway.config import JWKS_PATH, load_config
from gatewayctl import assertion_keys, devstack
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

START_SECONDS = 60.0
TTL = 5  # identity.ttl_seconds: short, so the rotation test waits little for old assertions
# How long the third-party server caches the JWKS (PyJWKClient lifespan and refetch cooldown):
# a new key must be published at least this long before it signs (docs/identity.md).
THIRD_PARTY_JWKS_CACHE = 3
BARE = ("x-mcp-user", "x-mcp-roles", "x-mcp-tenant", "x-mcp-issuer", "x-mcp-client-id",
        "x-mcp-decision-id", "x-mcp-tool")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devstack.Stack]:
    if not installed("ext_authz.__main__"):
        pytest.skip("needs ext_authz")
    tmp = tmp_path_factory.mktemp("assertion")
    policies = tmp / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("*_test.rego"))
    data_file = policies / "data.json"
    data: dict[str, Any] = json.loads(data_file.read_text(encoding="utf-8"))
    for name in ("whoami", "thirdparty"):
        data["gateway"]["servers"][name] = {"tenants": ["*"]}
        data["gateway"]["roles"]["admin"]["tools"][name] = ["*"]
    data_file.write_text(json.dumps(data), encoding="utf-8")
    servers: dict[str, dict[str, Any]] = {
        "whoami": {"module": "tests.e2e.whoami_server", "count": 1},
        "thirdparty": {"module": "tests.e2e.jwt_upstream", "count": 1},
    }
    path = stack_config(tmp, servers=servers, ext_authz=1, authz_transport=authz_transport(),
                        extra={"policy": {"engine": "embedded", "dir": str(policies)},
                               "identity": {"assertion": True, "ttl_seconds": TTL}})
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    public = raw["public_url"]
    # The third-party server learns the gateway's keys only from the published JWKS.
    raw["servers"]["thirdparty"]["args"] = [
        "--jwks-url", f"{public}{JWKS_PATH}", "--ca", str(tmp / "state" / "tls" / "ca.pem"),
        "--issuer", public, "--audience", f"{public}/mcp/thirdparty",
        "--jwks-cache-seconds", str(THIRD_PARTY_JWKS_CACHE)]
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))
        with devstack.running(load_config(path), ext_proc=HAS_EXT_PROC,
                              startup_timeout=START_SECONDS) as running:
            wait_until(lambda: _catalog_pinned(running), "the catalog to pin both servers' tools",
                       timeout=60)
            yield running


def _catalog_pinned(stack: devstack.Stack) -> bool:
    from gateway.catalog import Catalog

    with Catalog(stack.config.catalog.path) as catalog:
        return all(catalog.get(server, "whoami") is not None for server in ("whoami", "thirdparty"))


def _result(reply: httpx2.Response) -> dict[str, Any]:
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    assert "result" in body, body
    return body["result"]  # type: ignore[no-any-return]


def _direct_url(stack: devstack.Stack, server: str) -> str:
    inst = stack.config.server(server).instances[0]
    return f"http://{inst.host}:{inst.port}/mcp"


async def _direct(stack: devstack.Stack, headers: dict[str, str]) -> httpx2.Response:
    """A tools/call straight to the whoami server's port, past the gateway."""
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "whoami", "arguments": {}, "_meta": MODERN_META}}
    async with httpx2.AsyncClient(timeout=10) as http:
        return await http.post(_direct_url(stack, "whoami"), json=body, headers={
            "content-type": "application/json", "accept": "application/json, text/event-stream",
            "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "whoami",
            **headers})


def _signer(stack: devstack.Stack, *, clock: Any = time.time) -> AssertionSigner:
    ring = KeyRing.load(stack.config.identity.keys)
    return AssertionSigner(ring, stack.config.public_url.rstrip("/"), ttl=TTL, clock=clock)


async def _published(stack: devstack.Stack) -> list[str]:
    """The kids of the JWKS Envoy serves."""
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=10) as http:
        reply = await http.get(f"{stack.config.public_url}{JWKS_PATH}")
    return [k["kid"] for k in reply.json()["keys"]]


def _kid_of(reply: httpx2.Response) -> str | None:
    try:
        token = reply.json()["error"]["data"]["headers"]["x-mcp-assertion"]
    except (KeyError, TypeError, ValueError):
        return None
    return str(jwt.get_unverified_header(token)["kid"])


def _log(stack: devstack.Stack, server: str) -> str:
    path = Path(stack.config.state_dir) / "logs" / f"{server}-0.log"
    return path.read_text(encoding="utf-8", errors="replace")


async def test_our_server_sees_the_caller_from_the_assertion(stack: devstack.Stack) -> None:
    """A tools/call through the gateway reaches our server, whose tool sees the token's caller."""
    reply = await stateless_call(stack, "whoami", bearer(stack.config, "admin"), "whoami")
    seen = json.loads(_result(reply)["content"][0]["text"])
    assert seen["sub"] == "alice" and seen["tenant"] == "acme" and seen["roles"] == ["admin"]
    assert seen["issuer"] == stack.config.issuers[0].issuer
    assert seen["decision_id"]


async def test_upstream_gets_an_assertion_and_no_identity_headers(stack: devstack.Stack) -> None:
    """The upstream request carries x-mcp-assertion and none of the bare identity headers, even
    when the client sends them itself."""
    reply = await stateless_call(stack, "thirdparty", bearer(stack.config, "admin"), "whoami",
                                 headers={"x-mcp-user": "mallory", "x-mcp-roles": "admin"})
    result = _result(reply)
    headers = result["headers"]
    assert "x-mcp-assertion" in headers
    assert not [h for h in BARE if h in headers], headers


async def test_third_party_server_verifies_with_pyjwt_from_the_published_jwks(
        stack: devstack.Stack) -> None:
    """A server with no gateway code verifies the assertion with PyJWT's PyJWKClient against the
    JWKS endpoint, and the claims name the caller and that server as the audience."""
    reply = await stateless_call(stack, "thirdparty", bearer(stack.config, "admin"), "whoami")
    claims = _result(reply)["claims"]
    config = stack.config
    assert claims["iss"] == config.public_url.rstrip("/")
    assert claims["aud"] == config.resource_url("thirdparty")
    assert (claims["sub"], claims["tenant"], claims["roles"]) == ("alice", "acme", ["admin"])
    assert claims["exp"] - claims["iat"] <= TTL and claims["jti"] and claims["decision_id"]


async def test_jwks_endpoint_is_public_and_holds_no_private_key(stack: devstack.Stack) -> None:
    """GET of the JWKS path needs no token and lists the signing key's public half only."""
    async with httpx2.AsyncClient(verify=tls_context(stack), timeout=10) as http:
        reply = await http.get(f"{stack.config.public_url}{JWKS_PATH}")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"
    keys = reply.json()["keys"]
    assert keys and all("d" not in k and k["alg"] == "ES256" for k in keys)
    assert KeyRing.load(stack.config.identity.keys).signing.kid in {k["kid"] for k in keys}


@pytest.mark.parametrize("case", ["missing", "bare_headers", "forged", "expired", "wrong_audience"])
async def test_bad_assertion_straight_to_the_server_is_refused(stack: devstack.Stack,
                                                               case: str) -> None:
    """Past the gateway, a request without a valid assertion is refused 401 with a JSON-RPC
    error naming the reason, and the server logs that reason."""
    config = stack.config
    caller = Caller(sub="mallory", roles=("admin",))
    aud = config.server_audience("whoami")
    headers: dict[str, str] = {}
    expected = case
    if case == "bare_headers":
        headers = {"x-mcp-user": "mallory", "x-mcp-roles": "admin"}
        expected = "missing"
    elif case == "forged":
        impostor = new_private_jwk()
        impostor["kid"] = KeyRing.load(config.identity.keys).signing.kid
        ring = KeyRing.from_jwks({"keys": [impostor]})
        token = AssertionSigner(ring, config.public_url.rstrip("/")).mint(caller, aud, "d")
        headers = {"x-mcp-assertion": token}
    elif case == "expired":
        token = _signer(stack, clock=lambda: time.time() - 120).mint(caller, aud, "d")
        headers = {"x-mcp-assertion": token}
    elif case == "wrong_audience":
        token = _signer(stack).mint(caller, config.server_audience("thirdparty"), "d")
        headers = {"x-mcp-assertion": token}
    reply = await _direct(stack, headers)
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["data"]["reason"] == expected
    wait_until(lambda: f"caller assertion refused ({expected})" in _log(stack, "whoami"),
               f"the server to log the {expected} refusal", timeout=10)


async def test_replayed_assertion_straight_to_the_server_is_refused(stack: devstack.Stack) -> None:
    """A genuine assertion is accepted once; the same one again is refused as replayed."""
    token = _signer(stack).mint(Caller(sub="bob", tenant="acme", roles=("admin",)),
                                stack.config.server_audience("whoami"), "d-replay")
    first = await _direct(stack, {"x-mcp-assertion": token})
    assert json.loads(_result(first)["content"][0]["text"])["sub"] == "bob"
    again = await _direct(stack, {"x-mcp-assertion": token})
    assert again.status_code == 401
    assert again.json()["error"]["data"]["reason"] == "replayed"
    wait_until(lambda: "caller assertion refused (replayed)" in _log(stack, "whoami"),
               "the server to log the replay", timeout=10)


async def test_key_rotation_under_load_fails_no_request(stack: devstack.Stack) -> None:
    """add (published) -> reload -> promote (signs) -> retire after the old assertions expired
    -> reload, while calls to both servers keep going: every call succeeds, and the new key
    ends up the only one signing and published."""
    config = stack.config
    identity = config.identity
    old_kid = KeyRing.load(identity.keys).signing.kid
    token = bearer(config, "admin")
    failures: list[str] = []
    kids: set[str] = set()
    done = asyncio.Event()
    calls = 0
    phase = "before"

    async def load() -> None:
        nonlocal calls
        while not done.is_set():
            for server in ("whoami", "thirdparty"):
                reply = await stateless_call(stack, server, token, "whoami")
                calls += 1
                if reply.status_code != 200 or "result" not in reply.json():
                    failures.append(f"{phase} {server}: {reply.status_code} {reply.text[:120]} "
                                    f"{_kid_of(reply)}")
                elif server == "thirdparty":
                    kids.add(jwt.get_unverified_header(
                        reply.json()["result"]["headers"]["x-mcp-assertion"])["kid"])
                await asyncio.sleep(0.05)  # pacing: a bounded load, under the per-user rate limit

    async def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    workers = [asyncio.create_task(load()) for _ in range(2)]
    try:
        await wait_for(lambda: calls >= 10, "the first calls")
        new_kid = assertion_keys.add(identity)
        phase = "added"
        await asyncio.to_thread(devstack.reload, config)  # Envoy publishes both keys
        phase = "published"
        assert new_kid in await _published(stack), "the reloaded Envoy publishes the new key"
        # The rotation's own wait: every verifier's cached JWKS must have the new key.
        await asyncio.sleep(THIRD_PARTY_JWKS_CACHE + 1)
        assertion_keys.promote(identity, new_kid)
        phase = "promoted"
        await wait_for(lambda: new_kid in kids, "an assertion signed by the new key")
        # Every assertion the old key signed expires within TTL (+ the servers' leeway).
        await asyncio.sleep(TTL + 6)  # the old assertions' lifetime, not readiness
        retired = assertion_keys.retire(identity)
        phase = "retired"
        await asyncio.to_thread(devstack.reload, config)
        phase = "unpublished"
        settled = calls
        await wait_for(lambda: calls >= settled + 10, "calls after the old key was retired")
    finally:
        done.set()
        await asyncio.gather(*workers)
    assert not failures, (old_kid, new_kid, failures[:5])
    assert retired == [old_kid]
    assert await _published(stack) == [new_kid]
