"""The remote OPA backend against a real aiohttp server speaking OPA's REST data API."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from gateway.config import PolicyConfig
from gateway.policy import PolicyError
from gateway.policy.errors import PolicyEvalError
from gateway.policy.factory import build_engine
from gateway.policy.opa import OpaEngine


@dataclass
class FakeOpa:
    """POST /v1/data/<path> {"input": ...} -> {"result": ...}, as OPA answers."""

    results: dict[str, Any] = field(default_factory=dict)  # path -> result (missing: undefined)
    status: int = 200
    slow: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    raw_body: str | None = None
    seen: list[tuple[str, Any]] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    # OPA run with --authentication=token --authorization=basic: this bearer token or 401.
    token: str | None = None
    authorizations: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.authorizations.append(request.headers.get("Authorization"))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"code": "unauthorized", "message": "request rejected by "
                                      "administrative policy"}, status=401)
        body = await request.json()
        self.seen.append((path, body.get("input")))
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        if self.slow:  # held until the test ends: slower than any timeout
            await self.release.wait()
        if self.raw_body is not None:
            return web.Response(text=self.raw_body, content_type="application/json")
        if self.status != 200:
            return web.json_response({"code": "internal_error", "message": "boom"}, status=self.status)
        if path in self.results:
            return web.json_response({"result": self.results[path]})
        return web.json_response({})  # undefined document


@pytest.fixture
async def opa() -> AsyncIterator[tuple[FakeOpa, str]]:
    fake = FakeOpa()
    app = web.Application()
    app.router.add_post("/v1/data/{path:.+}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.release.set()
        await runner.cleanup()


@pytest.fixture
async def engine(opa: tuple[FakeOpa, str]) -> AsyncIterator[OpaEngine]:
    eng = OpaEngine(opa[1], "mcp/authz/decision", timeout=2.0)
    await eng.start()
    yield eng
    await eng.close()


async def test_decision_from_result(opa: tuple[FakeOpa, str], engine: OpaEngine) -> None:
    """The result document is checked against the contract; the input is sent as {"input": ...}."""
    fake, _ = opa
    fake.results["mcp/authz/decision"] = {"allow": False, "reason": "insufficient_scope",
                                          "missing_scope": "tools:call:files/stat"}
    d = await engine.decide({"mcp": {"method": "tools/call"}})
    assert not d.allow and d.missing_scope == "tools:call:files/stat" and d.http_status == 403
    assert fake.seen == [("mcp/authz/decision", {"mcp": {"method": "tools/call"}})]


async def test_undefined_denies(engine: OpaEngine) -> None:
    """No result (undefined) is a contract error deny."""
    d = await engine.decide({})
    assert not d.allow and d.error_code == "policy_contract_error"


async def test_query_other_rule(opa: tuple[FakeOpa, str], engine: OpaEngine) -> None:
    """query() posts to the rule's path and returns its raw value (None when undefined)."""
    opa[0].results["mcp/authz/visible_tools"] = ["stat"]
    assert await engine.query("mcp/authz/visible_tools", {"items": ["stat", "x"]}) == ["stat"]
    assert await engine.query("mcp/authz/nothing", {}) is None


@pytest.mark.parametrize("status", [500, 502, 503, 404, 400])
async def test_http_errors_fail_closed(opa: tuple[FakeOpa, str], engine: OpaEngine, status: int) -> None:
    """An error answer is a policy_error deny (503), with no retry."""
    opa[0].status = status
    d = await engine.decide({})
    assert not d.allow and d.error_code == "policy_error" and d.http_status == 503
    assert len(opa[0].seen) == 1


async def test_not_json_fails_closed(opa: tuple[FakeOpa, str], engine: OpaEngine) -> None:
    """A body that is not JSON is a policy_error deny."""
    opa[0].raw_body = "{not json"
    assert (await engine.decide({})).error_code == "policy_error"


async def test_slow_answer_times_out(opa: tuple[FakeOpa, str]) -> None:
    """A slow OPA is cut off at the timeout and denied."""
    opa[0].slow = True
    opa[0].results["mcp/authz/decision"] = True
    eng = OpaEngine(opa[1], "mcp/authz/decision", timeout=0.1)
    await eng.start()
    try:
        async with asyncio.timeout(5):
            d = await eng.decide({})
        assert d.error_code == "policy_error"
    finally:
        await eng.close()


async def test_unreachable_fails_closed() -> None:
    """Nothing listening: a policy_error deny, not an exception."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eng = OpaEngine(f"http://127.0.0.1:{port}", "mcp/authz/decision", timeout=1.0)
    await eng.start()
    try:
        assert (await eng.decide({})).error_code == "policy_error"
    finally:
        await eng.close()


async def test_connection_reused(opa: tuple[FakeOpa, str], engine: OpaEngine) -> None:
    """Sequential decisions share one keep-alive connection."""
    opa[0].results["mcp/authz/decision"] = True
    for _ in range(5):
        assert (await engine.decide({"n": 1})).allow
    assert len(opa[0].peers) == 1


async def test_non_json_input_fails_closed(opa: tuple[FakeOpa, str], engine: OpaEngine) -> None:
    """An input json cannot encode is a deny, never sent."""
    d = await engine.decide({"bad": {1, 2}})
    assert d.error_code == "policy_error" and opa[0].seen == []


def test_rejects_url_with_path() -> None:
    """The OPA URL names the server only; the data path comes from the entrypoint."""
    with pytest.raises(PolicyError, match="no path"):
        OpaEngine("http://127.0.0.1:8181/v1/data/x", "mcp/authz/decision")


TOKEN = "k" * 40


async def test_bearer_token_is_sent(opa: tuple[FakeOpa, str]) -> None:
    """With a token, every query carries Authorization: Bearer <token>, which an OPA requiring
    token authentication accepts."""
    opa[0].token = TOKEN
    opa[0].results["mcp/authz/decision"] = True
    eng = OpaEngine(opa[1], "mcp/authz/decision", timeout=2.0, token=TOKEN)
    await eng.start()
    try:
        assert (await eng.decide({})).allow
        assert (await eng.decide({})).allow
    finally:
        await eng.close()
    assert opa[0].authorizations == [f"Bearer {TOKEN}"] * 2


@pytest.mark.parametrize("token", [None, "w" * 40])
async def test_refused_credentials_fail_closed(opa: tuple[FakeOpa, str], token: str | None) -> None:
    """No token or a wrong one: OPA answers 401, the decision is a policy_error deny and the
    error says the credentials were refused."""
    opa[0].token = TOKEN
    opa[0].results["mcp/authz/decision"] = True
    eng = OpaEngine(opa[1], "mcp/authz/decision", timeout=2.0, token=token)
    await eng.start()
    try:
        d = await eng.decide({})
        assert not d.allow and d.error_code == "policy_error"
        with pytest.raises(PolicyEvalError, match=r"refused the gateway's credentials \(HTTP 401\)"):
            await eng.evaluate("mcp/authz/decision", {})
    finally:
        await eng.close()


@pytest.mark.parametrize("token", ["", "a b", "x\ny", "é", "t" * 4097])
def test_rejects_unsendable_tokens(token: str) -> None:
    """A token that is not one header-safe word is refused at construction, naming the key."""
    with pytest.raises(PolicyError, match="policy.opa_token"):
        OpaEngine("http://127.0.0.1:8181", "mcp/authz/decision", token=token)


async def test_factory_reads_the_token_secret(opa: tuple[FakeOpa, str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """policy.opa_token: ${NAME} is read from the environment when the engine is built; an unset
    secret stops the build naming the key and the variable."""
    cfg = PolicyConfig(engine="opa", opa_url=opa[1], opa_token="${MCP_GATEWAY_OPA_TOKEN}")
    monkeypatch.delenv("MCP_GATEWAY_OPA_TOKEN", raising=False)
    with pytest.raises(PolicyError, match=r"policy\.opa_token: the secret MCP_GATEWAY_OPA_TOKEN is not set"):
        build_engine(cfg)
    monkeypatch.setenv("MCP_GATEWAY_OPA_TOKEN", TOKEN)
    opa[0].token = TOKEN
    opa[0].results["mcp/authz/decision"] = True
    eng = build_engine(cfg)
    await eng.start()
    try:
        assert (await eng.decide({})).allow
    finally:
        await eng.close()
