"""The bridge holds a caller assertion to the tool it was issued for, like mcp_servers.core: a
tools/call of another tool than the assertion's ``tool`` claim is refused, 401 tool_mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from gateway.assertion import AssertionSigner, KeyRing, new_private_jwk
from gateway.caller import Caller
from tests.mcp_bridge.conftest import run_bridge
from tests.mcp_bridge.test_bridge_http import _modern

ISS = "https://gw.example"
AUD = "https://gw.example/mcp/toy"
CALLER = Caller(sub="alice", tenant="acme", roles=("reader",))


async def test_a_tools_call_of_another_tool_than_the_claim_is_refused(
        tmp_path: Path, toy_argv: list[str]) -> None:
    """An assertion for ``cwd`` does not call ``pid`` through the bridge (401 tool_mismatch,
    logged, nothing reaches the child); one for ``pid`` does."""
    keys = KeyRing.from_jwks({"keys": [new_private_jwk()]})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.public_jwks()))
    signer = AssertionSigner(keys, ISS)
    with run_bridge(tmp_path, toy_argv, "--pool", "1", "--assertion-jwks", str(jwks),
                    "--assertion-issuer", ISS, "--assertion-audience", AUD) as bridge:
        async with aiohttp.ClientSession() as http:
            body, headers = _modern("tools/call", {"name": "pid", "arguments": {}}, "pid")
            wrong = {**headers, "x-mcp-assertion": signer.mint(CALLER, AUD, "d-1", tool="cwd")}
            async with http.post(bridge.url, json=body, headers=wrong) as refused:
                assert refused.status == 401
                error = (await refused.json())["error"]
            assert error["data"]["reason"] == "tool_mismatch"
            right = {**headers, "x-mcp-assertion": signer.mint(CALLER, AUD, "d-2", tool="pid")}
            async with http.post(bridge.url, json=body, headers=right) as answered:
                assert answered.status == 200
                assert "result" in await answered.json()
        assert "caller assertion refused (tool_mismatch)" in bridge.logs()
