"""A caller assertion names the tool ext_authz allowed (its ``tool`` claim): a server refuses a
tools/call of any other tool with it, 401 ``tool_mismatch``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.assertion import AssertionSigner, KeyRing, new_private_jwk
from gateway.caller import Caller
from mcp_servers.core import ServerSettings
from tests.mcp_servers.core.conftest import JSON_AND_SSE, Served, start

ISS = "https://gw.example"
AUD = "https://gw.example/mcp/core-test"
V = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": {}}
CALLER = Caller(sub="alice", tenant="acme", roles=("reader",))


@pytest.fixture
async def asserted(tmp_path: Path) -> AsyncIterator[tuple[Served, AssertionSigner]]:
    keys = KeyRing.from_jwks({"keys": [new_private_jwk()]})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.public_jwks()))
    served = await start(ServerSettings(assertion_jwks=str(jwks), assertion_issuer=ISS,
                                        assertion_audience=AUD))
    try:
        yield served, AssertionSigner(keys, ISS)
    finally:
        await served.http.close()
        await served.runner.cleanup()


async def _post(served: Served, assertion: str, method: str, params: dict[str, Any],
                name: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Accept": JSON_AND_SSE,
               "MCP-Protocol-Version": V, "Mcp-Method": method, "x-mcp-assertion": assertion}
    if name is not None:
        headers["Mcp-Name"] = name
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                         "params": {**params, "_meta": META}})
    return await served.client.raw(body, headers)


async def test_a_tools_call_of_another_tool_than_the_claim_is_refused(
        asserted: tuple[Served, AssertionSigner], caplog: pytest.LogCaptureFixture) -> None:
    """An assertion for ``whoami`` does not call ``echo`` (401 tool_mismatch, logged); one for
    ``echo`` does."""
    served, signer = asserted
    with caplog.at_level(logging.WARNING):
        status, body = await _post(served, signer.mint(CALLER, AUD, "d-1", tool="whoami"),
                                   "tools/call", {"name": "echo", "arguments": {"text": "hi"}},
                                   "echo")
    assert status == 401, body
    assert body["error"]["data"]["reason"] == "tool_mismatch" and "result" not in body
    assert any("caller assertion refused (tool_mismatch)" in r.getMessage() for r in caplog.records)
    status, body = await _post(served, signer.mint(CALLER, AUD, "d-2", tool="echo"), "tools/call",
                               {"name": "echo", "arguments": {"text": "hi"}}, "echo")
    assert status == 200 and body["result"]["content"][0]["text"] == "hi", body


async def test_the_tool_claim_binds_tools_call_only(asserted: tuple[Served, AssertionSigner]) -> None:
    """Other methods ignore the claim, and an assertion without one (minted for no tool) is
    still taken for a tools/call as before."""
    served, signer = asserted
    status, body = await _post(served, signer.mint(CALLER, AUD, "d-3", tool="whoami"),
                               "tools/list", {})
    assert status == 200 and "tools" in body["result"], body
    status, body = await _post(served, signer.mint(CALLER, AUD, "d-4"), "tools/call",
                               {"name": "echo", "arguments": {"text": "ok"}}, "echo")
    assert status == 200 and body["result"]["content"][0]["text"] == "ok", body
