"""The policy's audit_redact obligation reaches the server's own audit entry: ext_authz signs it
into the caller assertion, the server leaves the named fields out of its entry of the call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.assertion import AssertionSigner, KeyRing, new_private_jwk
from gateway.caller import Caller
from gateway.telemetry.audit import REDACTED, iter_audit
from mcp_servers.core import ServerSettings
from tests.mcp_servers.core.conftest import JSON_AND_SSE, Served, start

ISS = "https://gw.example"
AUD = "https://gw.example/mcp/core-test"
V = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": {}}
CALLER = Caller(sub="alice", tenant="acme", client_id="cli", roles=("reader",))


@pytest.fixture
async def asserted(tmp_path: Path) -> AsyncIterator[tuple[Served, AssertionSigner, Path]]:
    keys = KeyRing.from_jwks({"keys": [new_private_jwk()]})
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.public_jwks()))
    audit = tmp_path / "core-test.jsonl"
    served = await start(ServerSettings(assertion_jwks=str(jwks), assertion_issuer=ISS,
                                        assertion_audience=AUD, audit_file=str(audit)))
    try:
        yield served, AssertionSigner(keys, ISS), audit
    finally:
        await served.http.close()
        await served.runner.cleanup()


async def _call(served: Served, assertion: str, rid: str) -> Any:
    headers = {"Content-Type": "application/json", "Accept": JSON_AND_SSE,
               "MCP-Protocol-Version": V, "Mcp-Method": "tools/call", "Mcp-Name": "echo",
               "x-mcp-assertion": assertion, "x-request-id": rid}
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                         "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": META}})
    status, answer = await served.client.raw(body, headers)
    assert status == 200 and "result" in answer, answer
    return answer


async def test_the_servers_entry_leaves_out_what_the_obligation_names(
        asserted: tuple[Served, AssertionSigner, Path]) -> None:
    """An assertion carrying audit_redact [sub, args_digest] gives an entry without them (the
    rest intact); one without the claim keeps every field; a malformed obligation (a name the
    trail does not know) redacts every redactable field."""
    served, signer, audit = asserted
    await _call(served, signer.mint(CALLER, AUD, "d-1", "echo", ["sub", "args_digest"]), "r-1")
    await _call(served, signer.mint(CALLER, AUD, "d-2", "echo"), "r-2")
    await _call(served, signer.mint(CALLER, AUD, "d-3", "echo", ["password"]), "r-3")
    entries = {e["request_id"]: e for e in iter_audit(audit)}
    redacted, plain, everything = entries["r-1"], entries["r-2"], entries["r-3"]
    assert redacted["sub"] is None and redacted["args_digest"] is None
    assert redacted["tenant"] == "acme" and redacted["client_id"] == "cli"
    assert redacted["target"] == "echo" and redacted["decision_id"] == "d-1"
    assert plain["sub"] == "alice" and plain["args_digest"] is not None
    assert everything["sub"] is None and everything["tenant"] is None
    assert everything["client_id"] is None and everything["args_digest"] is None
    assert everything["target"] == REDACTED
